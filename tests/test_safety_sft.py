"""Safety fine-tuning data (support_chat_safety) and the recipe's redteam extra: refusals come from the guard's
train part, the scan from its test part, so neither the fine-tuned model nor the guard has seen what is scanned."""

from __future__ import annotations

import json

from conftest import shared_data
from slmforge.data.tasks.support_chat import guard_parts, prepare_support_chat_safety
from slmforge.recipes import run_recipe
from slmforge.safety.classifier import make_data, split_groups
from slmforge.safety.probes import BENIGN_FILE, harmful_requests, read_probes

TINY_MODEL = ("model: {preset: 200k, vocab_size: 300, context: 64,\n"
              "        overrides: {num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64}}\n")


def test_refusals_come_from_the_guards_train_part_and_the_scan_from_its_test_part(tmp_path):
    data = shared_data("redteam").parent
    stats = prepare_support_chat_safety(data, tmp_path / "d", n=60, n_test=5, n_val=5, scan_jailbreaks=20)
    rows = [json.loads(x) for x in (tmp_path / "d/train_safety.jsonl").read_text().splitlines()]
    refusals = [r for r in rows if r["id"].startswith("refusal-")]
    assert len(rows) == stats["counts"]["train"] + len(refusals) and len(refusals) == stats["safety"]["refusal_rows"]
    assert all(r["messages"][-1]["content"].startswith(("I", "Sorry", "That")) for r in refusals)
    scan = read_probes(tmp_path / "d/redteam_probes.jsonl")
    assert {p.suite for p in scan} == {"harmful", "jailbreak", "benign"} and sum(p.suite == "jailbreak" for p in scan) == 20
    trained_prompts = {r["messages"][1]["content"] for r in refusals}
    # no scanned request (with its document, as the model reads it) is a trained one or inside one; HarmBench's
    # contextual behaviours share a request and differ in their document, so the document counts
    asked = [p.messages()[-1]["content"] for p in scan if p.suite == "harmful"]
    assert not any(a in trained_prompts or a in t for a in asked for t in trained_prompts)
    # the same parts as `slmforge guard train --kind request` (its defaults) makes from all its data
    guard_rows = make_data("request", data, BENIGN_FILE, 0)
    guard = {r.group: i for i, part in enumerate(split_groups(guard_rows, (0.6, 0.2, 0.2), 0)) for r in part}
    ours = guard_parts([*harmful_requests(data), *read_probes(BENIGN_FILE)])
    assert ours and all(guard[g] == i for g, i in ours.items())
    assert all(ours[p.behavior if p.suite != "benign" else f"benign:{p.behavior}"] == 2 for p in scan)
    assert all(ours[r["behavior"]] == 0 for r in refusals) and {r["suite"] for r in refusals} == {"harmful",
                                                                                                   "jailbreak"}


def test_recipe_scans_every_variant_on_the_held_out_probes(tmp_path):
    data = shared_data("redteam").parent
    recipe = tmp_path / "safety.yaml"
    recipe.write_text(f"""name: mini-safety
data: {{loader: support_chat_safety, options: {{n: 40, n_test: 3, n_val: 3, scan_limit: 3}}}}
{TINY_MODEL}variants:
  - name: plain
    init: scratch
    finetune: {{task: chat, max_steps: 2, batch_size: 4, seq_len: 48}}
  - name: safety
    init: scratch
    train: train_safety.jsonl
    finetune: {{task: chat, max_steps: 2, batch_size: 4, seq_len: 48}}
predict: {{mode: generate, max_tokens: 4, batch_size: 2}}
eval: {{task: summarization, metric: rougeL}}
extras: [redteam]
""")
    report = run_recipe(recipe, tmp_path / "run", data)
    red = report["extras"]["redteam"]
    assert set(red) == {"plain", "safety"}
    for v in red.values():
        assert {s: v[s]["probes"] for s in ("harmful", "jailbreak", "benign")} == {"harmful": 3, "jailbreak": 3,
                                                                                    "benign": 3}
        assert v["harmful"]["metric"] == "attack_success_rate" and v["benign"]["metric"] == "over_refusal_rate"
        assert 0 <= v["harmful"]["rate"] <= 1
    assert (tmp_path / "run/variants/safety/redteam/hits.jsonl").is_file()
