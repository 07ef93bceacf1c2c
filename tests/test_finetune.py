"""Fine-tuning: answer masks, learning a toy task, LoRA and merging, classifier heads, early stopping,
bad task data, and exact resume after an interruption."""

from __future__ import annotations

import json
import random
import signal
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

import slmforge.train.finetune as ft
import slmforge.train.heads as ft_heads
import slmforge.train.rows as ft_rows
from conftest import TINY_LLAMA, classify_rows, save_tiny_llama
from slmforge.config import ModelConfig
from slmforge.errors import SlmforgeError
from slmforge.model import LlamaModel
from slmforge.modeldir import ModelDir
from slmforge.train.finetune import FinetuneConfig, finetune
from slmforge.train.heads import merge_lora, predict_labels
from slmforge.train.loop import TrainConfig, TrainingInterrupted, read_metrics, train

TINY = TINY_LLAMA
FAST = dict(batch_size=16, seq_len=32, lr=3e-3, min_lr=3e-4, warmup_fraction=0.1, threads=1, progress=False,
            log_every=5, ckpt_every=0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("base") / "model")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _lm_rows(n, seed=0):
    rng = random.Random(seed)
    names = ["Tom", "Lily", "Sam", "Mia"]
    return [{"prompt": f"{name} saw the", "completion": f" {name.lower()} ball."}
            for name in (rng.choice(names) for _ in range(n))]


# ------------------------------------------------------------------------------------------------- masks


def test_masks_cover_exactly_the_answer(base_dir):
    tok = ModelDir.open(base_dir).load_tokenizer()
    lm = ft_rows.encode_records([("f:1", {"prompt": "Tom saw the", "completion": " big boat."})], tok,
                           FinetuneConfig(task="lm"), seq_len=32)[0]
    answer_ids = [i for i, a in zip(lm.ids, lm.answer, strict=True) if a]
    assert answer_ids == tok.encode(" big boat.") + [tok.eos_id]
    assert lm.ids[:len(lm.ids) - len(answer_ids)] == tok.encode("Tom saw the", bos=True)

    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you."}]
    chat = ft_rows.encode_records([("f:2", {"messages": msgs})], tok, FinetuneConfig(task="chat"), seq_len=64)[0]
    assert chat.ids == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False))
    runs, cur = [], []
    for i, a in zip(chat.ids, chat.answer, strict=True):
        if a:
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    assert [tok.decode(r, skip_special=False) for r in runs] == ["Hello there.<|end|>\n", "See you.<|end|>\n"]

    # The batch's targets are exactly the answer tokens, shifted by one.
    batch = ft_rows.collate([lm, chat], pad_id=0, classifier=False)
    for row, ex in enumerate([lm, chat]):
        kept = batch["y"][row][batch["y"][row] != -100].tolist()
        assert kept == [i for i, a in zip(ex.ids[1:], ex.answer[1:], strict=True) if a]

    # Truncation drops the prompt's start and keeps the whole answer.
    long = ft_rows.encode_records([("f:3", {"prompt": "Tom saw the ball. " * 20, "completion": " big boat."})], tok,
                             FinetuneConfig(task="lm"), seq_len=16)[0]
    assert len(long.ids) == 17 and [i for i, a in zip(long.ids, long.answer, strict=True) if a] == answer_ids


# ------------------------------------------------------------------------------------------- learning


def test_classifier_head_learns_saves_and_predicts(tmp_path, base_dir):
    train_f = _jsonl(tmp_path / "train.jsonl", classify_rows(300))
    val_f = _jsonl(tmp_path / "val.jsonl", classify_rows(60, seed=1))
    s = finetune(base_dir, train_f, tmp_path / "run", FinetuneConfig(task="classify", head="classifier", max_steps=40, eval_every=20, **FAST), val_path=val_f)
    assert s["metrics"]["val_accuracy"] > 0.9  # chance is 0.5
    model_dir = tmp_path / "run" / "model"
    meta = ModelDir.open(model_dir).meta
    assert meta["classifier"]["labels"] == ["cat", "dog"] and (model_dir / ft_heads.HEAD_FILE).is_file()
    assert meta["parent"]["path"] == str(base_dir.resolve()) and len(meta["data"]["train_sha256"]) == 16
    rows = classify_rows(20, seed=2)
    preds = predict_labels(model_dir, [r["text"] for r in rows])
    assert sum(p == r["label"] for p, r in zip(preds, rows, strict=True)) >= 18


def test_balanced_class_weights_and_macro_f1_selection(tmp_path, base_dir):
    from slmforge.evaluate.tasks import classification_metrics

    exs = [ft_rows.Example([1], [False], label=lab) for lab in [0, 0, 0, 1]]
    assert torch.allclose(ft_heads.balanced_class_weights(exs, 3), torch.tensor([4 / 6, 2.0, 0.0]))
    gen = torch.Generator().manual_seed(0)
    pred, gold = torch.randint(0, 3, (200,), generator=gen), torch.randint(0, 3, (200,), generator=gen)
    ref = classification_metrics([str(x) for x in gold.tolist()], [str(x) for x in pred.tolist()], ["0", "1", "2"])
    assert ft_heads.macro_f1(pred, gold, 3) == pytest.approx(ref["macro_f1"] / 100)
    with pytest.raises(SlmforgeError, match="class_weights balanced needs"):
        FinetuneConfig(task="classify", head="generative", class_weights="balanced")

    # 1 in 8 examples is a dog: balanced weights and macro-F1 selection still learn both classes
    rows = [r for r in classify_rows(900) if r["label"] == "cat"][:350]
    rows += [r for r in classify_rows(900, seed=3) if r["label"] == "dog"][:50]
    random.Random(0).shuffle(rows)
    val_f = _jsonl(tmp_path / "val.jsonl", classify_rows(60, seed=1))
    cfg = FinetuneConfig(task="classify", head="classifier", class_weights="balanced", select_metric="macro_f1")
    s = finetune(base_dir, _jsonl(tmp_path / "train.jsonl", rows), tmp_path / "run", replace(cfg, max_steps=40, eval_every=20, **FAST), val_path=val_f)
    assert s["metrics"]["val_macro_f1"] > 0.85
    assert json.loads((tmp_path / "run" / "finetune.json").read_text())["train"]["best_metric"] == "val_macro_f1"


def test_lm_finetune_loss_drops(tmp_path, base_dir):
    train_f = _jsonl(tmp_path / "train.jsonl", _lm_rows(200))
    s = finetune(base_dir, train_f, tmp_path / "run", FinetuneConfig(task="lm", max_steps=80, eval_every=40, **FAST))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.5
    assert s["metrics"]["val_loss"] < 1.5 and s["data"]["val_examples"] == 20


# ----------------------------------------------------------------------------------------------- LoRA


def test_lora_trains_only_adapters_and_merges(tmp_path, base_dir):
    train_f = _jsonl(tmp_path / "train.jsonl", _lm_rows(120))
    cfg = FinetuneConfig(task="lm", mode="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                         lora_targets=["q_proj", "v_proj", "down_proj"], merge=True)
    s = finetune(base_dir, train_f, tmp_path / "run", replace(cfg, max_steps=15, eval_every=0, **FAST))
    c = ModelConfig(**TINY)
    kv = c.num_key_value_heads * c.head_dim
    per_layer = 4 * (c.hidden_size + c.hidden_size) + 4 * (c.hidden_size + kv) + 4 * (c.intermediate_size + c.hidden_size)
    assert s["metrics"]["trainable_params"] == c.num_hidden_layers * per_layer
    assert s["metrics"]["total_params"] == c.n_params + c.num_hidden_layers * per_layer

    # The base weights did not move; the adapters did.
    base = ModelDir.open(base_dir).load_model().state_dict()
    trained = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["model"]
    for k, v in trained.items():
        name = k.removeprefix("base_model.model.").replace(".base_layer", "")
        if "lora_" in k:
            assert "lora_A" in k or v.abs().sum() > 0  # lora_B starts at zero and must have learned
        else:
            assert torch.equal(v, base[name]), k

    # merge-lora: the merged directory gives the logits of base + adapter, in slmforge and transformers.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = merge_lora(base_dir, tmp_path / "run" / "adapter", tmp_path / "merged")
    ids = torch.tensor([ModelDir.open(base_dir).load_tokenizer().encode("Tom saw the ball.", bos=True)])
    with torch.no_grad():
        with_adapter = PeftModel.from_pretrained(ModelDir.open(base_dir).load_model(),
                                                 str(tmp_path / "run" / "adapter")).eval()(ids)[0]
        ours = ModelDir.open(merged).load_model()(ids)[0]
        hf = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
        also_merged = ModelDir.open(tmp_path / "run" / "model").load_model()(ids)[0]
    assert (ours - with_adapter).abs().max() < 1e-5 and (hf - with_adapter).abs().max() < 1e-4
    assert torch.allclose(also_merged, ours, atol=1e-6)
    assert ModelDir.open(merged).meta["stage"] == "merge-lora"


def test_lora_with_bf16_base_matches_fp32_base_under_autocast(tmp_path, base_dir):
    """QLoRA's idea at 16 bits: frozen projections stored in bf16. Under bf16 autocast every matmul rounds
    its fp32 weight to bf16 anyway, so training follows the fp32-base run; the merge uses the fp32 base."""
    train_f = _jsonl(tmp_path / "train.jsonl", _lm_rows(120))
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = FinetuneConfig(task="lm", mode="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                             lora_targets=["q_proj", "v_proj", "down_proj"], merge=True, base_dtype=dtype)
        finetune(base_dir, train_f, tmp_path / dtype, replace(cfg, max_steps=30, eval_every=0, **FAST))
        runs[dtype] = [r["loss"] for r in read_metrics(tmp_path / dtype / "metrics.jsonl") if "loss" in r]
    assert runs["bfloat16"][-1] < runs["bfloat16"][0] - 0.05, runs
    assert max(abs(a - b) for a, b in zip(runs["float32"], runs["bfloat16"], strict=True)) < 2e-3
    state = torch.load(tmp_path / "bfloat16" / "checkpoints" / "last.pt", weights_only=False)["model"]
    frozen = {k: v.dtype for k, v in state.items() if "base_layer" in k or k.endswith(("gate_proj.weight", "k_proj.weight"))}
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    assert {v.dtype for k, v in state.items() if "lora_" in k or "embed" in k or "norm" in k} == {torch.float32}
    ids = torch.tensor([ModelDir.open(base_dir).load_tokenizer().encode("Tom saw the ball.", bos=True)])
    with torch.no_grad():
        a = ModelDir.open(tmp_path / "float32" / "model").load_model()(ids)[0]
        b = ModelDir.open(tmp_path / "bfloat16" / "model").load_model()(ids)[0]
    assert (a - b).abs().max() < 0.05  # the same adapter up to bf16 rounding in training
    with pytest.raises(SlmforgeError, match="base_dtype bfloat16 is for mode lora"):
        FinetuneConfig(base_dtype="bfloat16")
    with pytest.raises(SlmforgeError, match="needs precision bf16"):
        finetune(base_dir, train_f, tmp_path / "fp32", FinetuneConfig(mode="lora", base_dtype="bfloat16", max_steps=2, eval_every=0, **{**FAST, "precision": "fp32"}))


def test_lora_targets_must_exist(tmp_path, base_dir):
    train_f = _jsonl(tmp_path / "train.jsonl", _lm_rows(20))
    with pytest.raises(SlmforgeError, match="qkv_proj"):
        finetune(base_dir, train_f, tmp_path / "run", FinetuneConfig(mode="lora", lora_targets=["qkv_proj"], max_steps=2, **FAST))


# --------------------------------------------------------------------------------------- early stopping


def test_early_stopping_restores_best(tmp_path):
    """A scripted val metric: best at the 2nd evaluation, then 2 without improvement stop the run."""
    def get_batch(i):
        x = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(i))
        return x[:, :-1], x[:, 1:]

    scores = iter([0.5, 0.8, 0.7, 0.6, 0.9, 0.9])
    cfg = TrainConfig(max_steps=30, batch_size=2, seq_len=16, eval_every=2, log_every=1, ckpt_every=0, threads=1,
                      progress=False, best_metric="val_score", best_mode="max", patience=2)
    model = LlamaModel(ModelConfig(**TINY))
    res = train(model, get_batch, cfg, tmp_path, eval_batches=lambda: [get_batch(99)],
                on_eval=lambda step, loss: {"val_score": next(scores)})
    assert res.stopped_early and res.step == 8 and res.best_step == 4 and res.best_value == 0.8
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=False)
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert best["step"] == 4 and last["step"] == 8
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in best["model"].items())  # the model holds the best weights
    assert not all(torch.equal(last["model"][k], v) for k, v in best["model"].items())
    assert [r["val_score"] for r in read_metrics(tmp_path / "metrics.jsonl") if "val_score" in r] == \
        [0.5, 0.8, 0.7, 0.6]
    again = train(LlamaModel(ModelConfig(**TINY)), get_batch, cfg, tmp_path)  # resuming a stopped run: no-op
    assert again.step == 8 and again.stopped_early and again.history == [] and again.best_step == 4


# ----------------------------------------------------------------------------------------------- bad data


def test_bad_task_data_names_file_and_line(tmp_path, base_dir):
    def run(train_rows, task="lm", val_rows=None, name="train.jsonl"):
        f = tmp_path / name
        f.write_text(train_rows)
        v = None
        if val_rows is not None:
            v = tmp_path / "val.jsonl"
            v.write_text(val_rows)
        with pytest.raises(SlmforgeError) as e:
            finetune(base_dir, f, tmp_path / "run", FinetuneConfig(task=task, max_steps=1, **FAST),
                     val_path=v)
        return str(e.value)

    ok = json.dumps({"prompt": "a", "completion": "b"})
    assert run(f"{ok}\n\n{json.dumps({'prompt': 'a'})}\n").endswith("train.jsonl:3: missing field 'completion'")
    assert "train.jsonl:2: invalid JSON" in run(f'{ok}\n{{"prompt": "a", \n')
    assert run("\n\n").endswith("train.jsonl: empty file (no examples)")
    cls = json.dumps({"text": "a b", "label": "pos"})
    msg = run(f"{cls}\n", task="classify", val_rows=f"{cls}\n{json.dumps({'text': 'c', 'label': 'neutral'})}\n")
    assert "val.jsonl:2: field 'label': unknown label 'neutral'" in msg
    assert "train.jsonl:1: field 'messages' has no assistant turn" in run(
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", task="chat")
    assert "messages[0] needs 'role'" in run(json.dumps({"messages": [{"role": "bot", "content": "x"}]}), task="chat")
    assert run("text\tlabel\nfine\t1\n\tbad\n", task="classify", name="t.tsv").endswith(
        "t.tsv:3: field 'text' is empty")
    assert "t.csv:2: missing field 'label'" in run("text,label\nno label here\n", task="classify", name="t.csv")


def test_label_smoothing_mixes_the_target_with_a_uniform_one():
    """(1 - eps) * NLL + eps * mean over the vocabulary of -log p, on answer tokens only; eps 0 is the plain loss."""
    model = LlamaModel(ModelConfig(**TINY))
    x = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(0))
    y = x.roll(-1, 1)
    y[:, :3] = -100  # the prompt
    batch = {"x": x, "y": y}
    logp = torch.log_softmax(model(x)[0].float(), -1)[y != -100]
    nll = -logp.gather(1, y[y != -100][:, None]).mean()
    smoothed = 0.9 * nll + 0.1 * (-logp.mean(-1)).mean()
    torch.testing.assert_close(ft_heads.lm_loss(model, batch, 0.1), smoothed)
    torch.testing.assert_close(ft_heads.lm_loss(model, batch), nll)
    assert ft_heads.loss_fn_of(FinetuneConfig(task="lm", label_smoothing=0.1))(model, batch) == \
        ft_heads.lm_loss(model, batch, 0.1)
    with pytest.raises(SlmforgeError, match="label_smoothing"):
        FinetuneConfig(label_smoothing=1.0)


def test_residual_dropout_acts_in_training_only():
    model = LlamaModel(ModelConfig(**TINY))
    x = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(0))
    before = model(x)[0]
    assert ft_heads.add_residual_dropout(model, 0.5) == 2 * TINY["num_hidden_layers"]
    torch.testing.assert_close(model.eval()(x)[0], before)  # eval: the logits are the model's own
    torch.manual_seed(0)
    assert not torch.allclose(model.train()(x)[0], before)
    with pytest.raises(SlmforgeError, match="dropout"):
        FinetuneConfig(dropout=1.0)


def test_length_grouped_batches_cover_each_epoch_once_and_cut_padding():
    """Batches of like-length rows: every example once per epoch, batch i a pure function of i, a fresh
    grouping each epoch, and far less padding than random batches."""
    rng = random.Random(0)
    lengths = tuple(rng.randint(1, 60) for _ in range(1000))
    per_epoch = 16  # ceil(1000 / 64): the last batch of an epoch holds the 40 left
    epochs = [[ft_rows.batch_indices(i, 1000, 64, 0, lengths) for i in range(e * per_epoch, (e + 1) * per_epoch)]
              for e in range(2)]
    for batches in epochs:
        assert sorted(j for b in batches for j in b) == list(range(1000))
    assert epochs[0] != epochs[1]
    assert ft_rows.batch_indices(5, 1000, 64, 0, lengths) == epochs[0][5]

    def padded(batches):
        return sum(len(b) * max(lengths[j] for j in b) for b in batches)

    random_batches = [ft_rows.batch_indices(i, 1000, 64, 0) for i in range(per_epoch)]
    assert sum(lengths) / padded(epochs[0]) > 0.9 > 0.6 > sum(lengths) / padded(random_batches)


# ------------------------------------------------------------------------------------------------ resume


def test_resume_after_interrupt_reproduces_losses(tmp_path, base_dir, monkeypatch):
    train_f = _jsonl(tmp_path / "train.jsonl", _lm_rows(100))
    cfg = FinetuneConfig(task="lm", mode="lora", lora_dropout=0.1)  # dropout: the RNG state must resume too
    tcfg = dict(max_steps=12, eval_every=4, **{**FAST, "log_every": 1, "batch_size": 8})
    ref = finetune(base_dir, train_f, tmp_path / "ref", replace(cfg, **tcfg))
    real = ft.batch_indices

    def interrupting(i, *a):
        if i == 7:  # Ctrl-C during step 8: the loop finishes the step, checkpoints, and stops
            signal.raise_signal(signal.SIGINT)
        return real(i, *a)

    monkeypatch.setattr(ft, "batch_indices", interrupting)
    with pytest.raises(TrainingInterrupted):
        finetune(base_dir, train_f, tmp_path / "run", replace(cfg, **tcfg))
    monkeypatch.setattr(ft, "batch_indices", real)
    again = finetune(base_dir, train_f, tmp_path / "run", replace(cfg, **tcfg))
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert losses == [r["loss"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")] and len(losses) == 12
    assert again["metrics"]["val_loss"] == ref["metrics"]["val_loss"]


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_finetune_lora_classify_and_merge(tmp_path, base_dir):
    from slmforge.cli import app

    train_f = _jsonl(tmp_path / "train.jsonl", classify_rows(200))
    r = CliRunner().invoke(app, ["finetune", "--model", str(base_dir), "--data", str(train_f), "--out",
                                 str(tmp_path / "run"), "--task", "classify", "--head", "classifier", "--mode",
                                 "lora", "--lora-r", "4", "--lora-targets", "q_proj,k_proj,v_proj,o_proj",
                                 "--steps", "10", "--lr", "3e-3", "--seq-len", "32", "--eval-every", "5",
                                 "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    assert "trainable params" in r.output and (tmp_path / "run" / "adapter" / ft_heads.HEAD_FILE).is_file()
    r = CliRunner().invoke(app, ["merge-lora", str(base_dir), str(tmp_path / "run" / "adapter"),
                                 str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "merged" / ft_heads.HEAD_FILE).is_file()
    assert len(predict_labels(tmp_path / "merged", ["Tom saw the cat ."])) == 1
    r = CliRunner().invoke(app, ["finetune", "--model", str(base_dir), "--data", str(tmp_path / "nope.jsonl"),
                                 "--out", str(tmp_path / "x")])
    assert r.exit_code != 0
