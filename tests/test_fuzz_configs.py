"""Input fuzzing (issue 16), YAML configs: task recipes (`slmforge run`), compress recipes, curate configs
(`data curate`), eval card and guard configs. Each valid file is edited as data (a field deleted, retyped,
set to junk: NaN, inf, huge, negative) and as text (bytes flipped, cut, inserted); the loader returns a config
or raises a SlmforgeError naming the file (and, for an edited field, its line)."""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st
from input_fuzz import deep, edited, file_bytes, fuzz_settings, read_or_error, single_thread

from conftest import run_cli
from slmforge.recipes import RECIPE_DIR

RECIPES = sorted(p.name for p in RECIPE_DIR.glob("*.yaml"))
COMPRESS = sorted(p.name for p in (RECIPE_DIR / "compress").glob("*.yaml"))

CARD = """models: [lora=runs/pubmedqa/pretrained-lora/model, big=openai:http://localhost:8000/v1#qwen2.5-7b]
large: big
out: runs/card-pubmedqa
prices: [big=0.15/0.60]
max_examples: 200
suites:
  - {kind: classification, file: runs/pubmedqa/data/test.jsonl, labels: ["yes", "no", "maybe"], metric: macro_f1}
  - {kind: summarization, file: runs/dialogsum/data/test.jsonl, max_tokens: 80}
  - {kind: speed, requests: 16, max_tokens: 64}
"""
GUARD = """input:
  classifier: runs/guard/request
  threshold: null
  judge: false
  actions: {classifier: refuse, pii: redact, blocked_terms: refuse, canary: refuse, judge: refuse}
output:
  classifier: runs/guard/response
  actions: {classifier: refuse, pii: redact, canary: refuse}
rules:
  pii: [email, phone, credit_card, ssn, api_key]
  blocked_terms: [foo]
  canaries: []
judge: null
refusal: "I'm sorry, but I can't help with that."
stream_hold: 32
"""
CURATE = """out: cur
inputs: [a.jsonl, b.txt]
text_field: text
split: paragraph
workers: 1
shard_docs: 100
on_error: fail
stages:
  - quality: {min_words: 3}
  - dedup: {threshold: 0.8}
"""

# A "billion laughs": 9**9 list items from 9 nine-item lists; expanded (by json.dumps, or a walk) it is a hang.
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # torch on one thread here: two threads on the two shared cores spin-wait (input_fuzz.single_thread)
    yield from single_thread()


def _loaders():
    from slmforge.compress.pipeline import load_compress_recipe
    from slmforge.data.curate import load_curate_config
    from slmforge.evaluate.card import load_card_config
    from slmforge.recipes import load_recipe
    from slmforge.safety.guard import load_guard_config

    return {"recipe": load_recipe, "compress": load_compress_recipe, "curate": load_curate_config,
            "card": load_card_config, "guard": load_guard_config}


def _valid(kind: str, name: str | None = None) -> str:
    if kind == "recipe":
        return (RECIPE_DIR / (name or "sst2.yaml")).read_text()
    if kind == "compress":
        return (RECIPE_DIR / "compress" / (name or COMPRESS[0])).read_text()
    return {"curate": CURATE, "card": CARD, "guard": GUARD}[kind]


def _load(kind: str, text: bytes | str) -> tuple[object, str | None, Path]:
    p = Path(tempfile.mkdtemp(prefix="fuzz-")) / f"{kind}.yaml"
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    cfg, err = read_or_error(lambda: _loaders()[kind](p), str(p))
    return cfg, err, p


def _no_nan(obj, seen=None) -> None:
    """A loaded config holds no NaN anywhere: `lr: .nan` must be refused, not trained with."""
    import dataclasses

    if isinstance(obj, float):
        assert not math.isnan(obj), "a NaN got through"
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _no_nan(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for v in obj.values():
            _no_nan(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _no_nan(v)


KINDS = ["recipe", "compress", "curate", "card", "guard"]


@fuzz_settings(60)
@given(st.sampled_from(KINDS), st.data())
@example("curate", {1: "a", "out": "x", "inputs": ["a"]})  # a TypeError sorting int and str keys
@example("recipe", {**yaml.safe_load(_valid("recipe")), "pretrain": {"max_minutes": math.nan}})
def test_config_fields(kind, data):
    """A field deleted, retyped or set to junk; written back as YAML."""
    if isinstance(data, st.DataObject):
        name = data.draw(st.sampled_from(RECIPES if kind == "recipe" else COMPRESS)) if kind in ("recipe", "compress") else None
        new = data.draw(edited(yaml.safe_load(_valid(kind, name)), max_edits=3))
    else:
        new = data
    cfg, err, p = _load(kind, yaml.safe_dump(new, allow_unicode=True))
    if err is None:
        _no_nan(cfg)
    else:  # an edited field is named with its line (file:N:) unless the problem is the whole file's
        assert re.search(re.escape(str(p)) + r"(:\d+)?: ", err), err


@fuzz_settings(40)
@given(st.sampled_from(KINDS), st.data())
@example("recipe", deep(3000))  # RecursionError in the YAML composer
@example("curate", deep(3000))
@example("recipe", BOMB)  # a hang: 387 million items once expanded
@example("curate", BOMB)
@example("guard", BOMB)
@example("card", "models: [a=x]\nout: .nan\n")
def test_config_text(kind, data):
    """The YAML text with bytes flipped, cut, inserted; random bytes; an empty file."""
    text = data.draw(file_bytes(_valid(kind).encode())) if isinstance(data, st.DataObject) else data
    cfg, err, _ = _load(kind, text)
    if err is None:
        _no_nan(cfg)


@pytest.mark.parametrize(("args", "text", "needle"), [
    (["run"], BOMB, "aliases"),
    (["run"], deep(3000), "nested too deeply"),
    (["data", "curate"], "1: a\nout: x\ninputs: [a.jsonl]\n", "unknown field 1"),
    (["data", "curate"], BOMB, "aliases"),
    (["run"], _valid("recipe").replace("max_minutes: 11", "max_minutes: .nan", 1), ":15: field 'pretrain.max_minutes': NaN"),
])
def test_cli_config_errors(capsys, monkeypatch, tmp_path, args, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    rc, _, err = run_cli(capsys, monkeypatch, *args, p)
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 1 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"error: {p}") and needle in lines[0], lines[0]
