"""Knowledge distillation: the divergences, the teacher term in pretrain and finetune, the top-k cache, and
the errors for a teacher that cannot teach this student."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import TINY_LLAMA, classify_rows, small_corpus
from slmforge.config import ModelConfig
from slmforge.data.pack import pack_tokens
from slmforge.errors import ConfigError, SlmforgeError
from slmforge.modeldir import ModelDir
from slmforge.tokenizer import train_tokenizer
from slmforge.train.distill import TopKCache
from slmforge.train.finetune import FinetuneConfig, finetune
from slmforge.train.kd import DistillConfig, divergence, topk_divergence
from slmforge.train.loop import read_metrics
from slmforge.train.pretrain import PretrainConfig, pretrain

FAST = dict(batch_size=8, seq_len=32, lr=3e-3, warmup_steps=2, threads=1, progress=False, eval_every=0,
            eval_batches=4, ckpt_every=0, log_every=1)
STUDENT = dict(TINY_LLAMA, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A packed corpus, its tokenizer, and a teacher pretrained on it."""
    root = tmp_path_factory.mktemp("distill")
    src = root / "corpus.txt"
    src.write_text("\n\n".join(small_corpus(400)), encoding="utf-8")
    tok = train_tokenizer(small_corpus(), vocab_size=320)
    pack_tokens(src, tok, root / "packed", val_fraction=0.1, progress=False)
    teacher = pretrain(root / "packed", root / "teacher", ModelConfig(**TINY_LLAMA), tok,
                       PretrainConfig(max_steps=60, **FAST))
    return root, tok, teacher


def test_divergences_match_their_definitions():
    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    fwd = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)  # KL(teacher || student)
    rev = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    assert torch.allclose(divergence(s, t, DistillConfig(loss="forward_kl")), fwd, atol=1e-6)
    assert torch.allclose(divergence(s, t, DistillConfig(loss="reverse_kl")), rev, atol=1e-6)
    # JSD(1/2) is the symmetric Jensen-Shannon divergence: bounded by ln 2, zero for equal distributions
    jsd = divergence(s, t, DistillConfig(loss="jsd", beta=0.5))
    m = 0.5 * (ls.exp() + lt.exp())
    ref = 0.5 * (lt.exp() * (lt - m.log())).sum(-1) + 0.5 * (ls.exp() * (ls - m.log())).sum(-1)
    assert torch.allclose(jsd, ref, atol=1e-6) and (jsd <= torch.log(torch.tensor(2.0))).all()
    assert divergence(t, t, DistillConfig(loss="jsd", beta=0.3)).abs().max() < 1e-6
    # temperature: the T^2-scaled KL of the softened distributions
    soft = divergence(s, t, DistillConfig(temperature=2.0))
    assert torch.allclose(soft, 4 * F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), reduction="none",
                                             log_target=True).sum(-1), atol=1e-6)
    # top-k with every class is the full divergence
    values, idx = t.topk(11, dim=-1)
    assert torch.allclose(topk_divergence(s, values, idx, DistillConfig()), fwd, atol=1e-5)
    with pytest.raises(ConfigError, match="cache needs top_k"):
        DistillConfig(cache="x")


def test_alpha_zero_is_plain_training_and_alpha_one_learns_the_teacher(world, tmp_path):
    root, tok, teacher = world
    student = ModelConfig(**STUDENT)
    cfg = PretrainConfig(max_steps=30, **FAST)
    plain = pretrain(root / "packed", tmp_path / "plain", student, tok, cfg)
    zero = pretrain(root / "packed", tmp_path / "zero", student, tok, cfg, teacher=teacher, kd=DistillConfig(alpha=0))
    losses = [[r["loss"] for r in read_metrics(d.parent / "metrics.jsonl")] for d in (plain, zero)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)  # the teacher term is off: same run
    kd = pretrain(root / "packed", tmp_path / "kd", student, tok, cfg, teacher=teacher, kd=DistillConfig(alpha=1))
    meta = ModelDir.open(kd).meta
    assert meta["stage"] == "distill" and meta["distill"]["teacher_params"] > meta["params"]
    # val_loss is the student's own cross-entropy (comparable with the plain run), not the KD loss
    assert 1 < meta["metrics"]["val_loss"] < 7

    # the KD student is closer to the teacher than the plain one, measured on held-out tokens
    from slmforge.data.pack import TokenShards

    x, _ = next(TokenShards(root / "packed", "val").iter_eval_batches(8, 32, 1))
    t_logits = ModelDir.open(teacher).load_model()(x)[0]

    def kl_to_teacher(d):
        return divergence(ModelDir.open(d).load_model()(x)[0], t_logits, DistillConfig()).mean().item()

    assert kl_to_teacher(kd) < kl_to_teacher(plain)


def test_topk_cache_is_filled_once_then_read(world, tmp_path, monkeypatch):
    root, tok, teacher = world
    cache = tmp_path / "cache"
    kd = DistillConfig(top_k=8, cache=str(cache))
    cfg = PretrainConfig(max_steps=6, **FAST)
    first = pretrain(root / "packed", tmp_path / "a", ModelConfig(**STUDENT), tok, cfg, teacher=teacher, kd=kd)
    assert json.loads((cache / "cache.json").read_text())["key"]["k"] == 8
    assert int(TopKCache(cache, json.loads((cache / "cache.json").read_text())["key"]).filled_batches) == 6

    # a second run reads every batch from the cache: the teacher never runs, and the losses are the same
    from slmforge.model import LlamaModel

    calls = []
    real_forward = LlamaModel.forward

    def counting(self, *a, **k):
        if self.config.num_hidden_layers == TINY_LLAMA["num_hidden_layers"]:
            calls.append(1)
        return real_forward(self, *a, **k)

    monkeypatch.setattr(LlamaModel, "forward", counting)
    second = pretrain(root / "packed", tmp_path / "b", ModelConfig(**STUDENT), tok, cfg, teacher=teacher, kd=kd)
    assert calls == []
    la, lb = ([r["loss"] for r in read_metrics(d.parent / "metrics.jsonl")] for d in (first, second))
    assert la == lb

    # other batches (another seed) are refused, not served the wrong logits
    with pytest.raises(SlmforgeError, match="top-k cache of another run .*seed"):
        pretrain(root / "packed", tmp_path / "c", ModelConfig(**STUDENT), tok, replace(cfg, seed=1), teacher=teacher,
                 kd=kd)
    (cache / "values.f16").write_bytes(b"\0" * 10)
    with pytest.raises(SlmforgeError, match="corrupt top-k cache"):
        pretrain(root / "packed", tmp_path / "d", ModelConfig(**STUDENT), tok, cfg, teacher=teacher, kd=kd)
    assert not (tmp_path / "d" / "model").exists()


def test_a_teacher_with_another_tokenizer_is_refused_before_training(world, tmp_path):
    root, tok, teacher = world
    other_tok = train_tokenizer(["completely different words here"] * 40, vocab_size=300)
    other = tmp_path / "other"
    md = ModelDir.open(teacher)
    from slmforge.modeldir import save_model_dir

    save_model_dir(other, md.load_model(), other_tok, {})
    with pytest.raises(SlmforgeError, match="teacher's tokenizer differs .*distill generate"):
        pretrain(root / "packed", tmp_path / "run", ModelConfig(**STUDENT), tok, PretrainConfig(max_steps=2, **FAST),
                 teacher=other)
    assert not (tmp_path / "run" / "model").exists()


def test_classifier_distillation_and_cli(world, tmp_path):
    root, tok, teacher = world
    train_f, val_f = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train_f.write_text("".join(json.dumps(r) + "\n" for r in classify_rows(300)))
    val_f.write_text("".join(json.dumps(r) + "\n" for r in classify_rows(60, seed=1)))
    ft = dict(task="classify", head="classifier", max_steps=40, eval_every=20, batch_size=16, seq_len=32, lr=3e-3,
              threads=1, progress=False, ckpt_every=0)
    t_run = finetune(teacher, train_f, tmp_path / "teacher_cls", FinetuneConfig(**ft), val_path=val_f)
    t_dir = t_run["outputs"]["model"]
    student = pretrain(root / "packed", tmp_path / "student", ModelConfig(**STUDENT), tok,
                       PretrainConfig(max_steps=5, **FAST))
    s_run = finetune(student, train_f, tmp_path / "kd_cls", FinetuneConfig(**ft), val_path=val_f, teacher=t_dir,
                     kd=DistillConfig(temperature=2.0))
    assert s_run["stage"] == "distill" and s_run["metrics"]["val_accuracy"] > 0.8
    with pytest.raises(SlmforgeError, match="labels .* are not the student's"):
        finetune(student, train_f, tmp_path / "bad", FinetuneConfig(**ft, labels=["dog", "cat"]), val_path=val_f,
                 teacher=t_dir)

    from slmforge.cli import app

    r = CliRunner().invoke(app, ["distill", "finetune", "--teacher", t_dir, "--model", str(student), "--data",
                                 str(train_f), "--val", str(val_f), "--out", str(tmp_path / "cli"), "--task",
                                 "classify", "--head", "classifier", "--steps", "4", "--seq-len", "32", "--alpha", "0.7",
                                 "--loss", "jsd"])
    assert r.exit_code == 0, r.output
    meta = ModelDir.open(tmp_path / "cli" / "model").meta
    assert meta["distill"]["kd"]["loss"] == "jsd" and meta["distill"]["kd"]["alpha"] == 0.7
    r = CliRunner().invoke(app, ["distill", "pretrain", "--teacher", str(teacher), "--data", str(root / "packed"),
                                 "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "--preset (fresh) or --init" in str(r.exception)


def test_prune_keeps_a_valid_model_and_healing_distils_it(world, tmp_path):
    from slmforge.compress.prune import PruneConfig, prune_dir

    root, tok, teacher = world
    calib = dict(batches=2, batch_size=4, seq_len=32)
    same = prune_dir(teacher, root / "packed", tmp_path / "same", PruneConfig(**calib))
    x = torch.randint(0, 300, (2, 16))
    t_model = ModelDir.open(teacher).load_model()
    assert torch.allclose(ModelDir.open(same).load_model()(x)[0], t_model(x)[0], atol=1e-5)  # keep all: same model

    cut = prune_dir(teacher, root / "packed", tmp_path / "cut",
                    PruneConfig(mlp=0.5, heads=0.5, hidden=0.75, layers=1, multiple_of=4, **calib))
    md = ModelDir.open(cut)
    c = md.config
    assert (c.num_hidden_layers, c.num_key_value_heads, c.num_attention_heads) == (1, 1, 2)
    assert c.hidden_size == 24 and c.intermediate_size == 44 and c.head_dim == TINY_LLAMA["hidden_size"] // 4
    assert md.meta["prune"]["params_pct"] < 60
    before = md.load_model()(x)[0]
    assert torch.isfinite(before).all()

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(cut).eval()
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, before, atol=1e-4)

    # heal: distil from the uncut model, starting from the cut one
    healed = pretrain(root / "packed", tmp_path / "heal", None, tok, PretrainConfig(max_steps=20, **FAST), init=cut,
                      teacher=teacher)
    meta = ModelDir.open(healed).meta
    assert meta["init"]["path"] == str(cut.resolve()) and meta["stage"] == "distill"
    assert ModelDir.open(healed).config.hidden_size == 24
    from slmforge.data.pack import TokenShards

    xv, yv = next(TokenShards(root / "packed", "val").iter_eval_batches(8, 32, 1))
    loss = [ModelDir.open(d).load_model()(xv, yv)[1].item() for d in (cut, healed)]
    assert loss[1] < loss[0]


def test_compress_pipeline_prunes_heals_quantizes_reports_and_resumes(world, tmp_path):
    from slmforge.compress.pipeline import CompressConfig, compress, load_compress_recipe
    from slmforge.compress.prune import PruneConfig
    from slmforge.compress.quantize import QuantizeConfig

    root, tok, teacher = world
    judge_text = tmp_path / "real.txt"
    judge_text.write_text("\n\n".join(small_corpus(20, seed=5)), encoding="utf-8")
    cfg = CompressConfig(prune=PruneConfig(mlp=0.5, hidden=0.75, batches=2, batch_size=4, seq_len=32, multiple_of=4),
                         heal=PretrainConfig(max_steps=8, **FAST), kd=DistillConfig(alpha=0.5),
                         quantize=QuantizeConfig(bits=8), judge_docs=10, decode_tokens=8, decode_batch=2, threads=1)
    out = tmp_path / "out"
    report = compress(teacher, root / "packed", out, cfg, [judge_text], progress=False)
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["original", "pruned", "healed", "int8"]
    assert rows["pruned"]["params_vs_original"] < 0.8 and rows["healed"]["params"] == rows["pruned"]["params"]
    assert rows["int8"]["weights_mb"] < 0.5 * rows["healed"]["weights_mb"]  # integers instead of floats
    assert rows["healed"]["bits_per_byte"][0]["bits_per_byte"] < rows["pruned"]["bits_per_byte"][0]["bits_per_byte"]
    # the task metric: healing lowers the pruned model's val loss; int8 changes it by little
    assert rows["healed"]["val_loss"] < rows["pruned"]["val_loss"] and abs(rows["int8"]["val_loss_change_pct"]
                                                                           - rows["healed"]["val_loss_change_pct"]) < 2
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in rows.values())
    assert ModelDir.open(out / "quantized").meta["quantization"]["bits"] == 8
    assert "| int8 |" in (out / "report.md").read_text() and (out / "report.png").stat().st_size > 1000
    # a rerun finds every stage finished and measured: nothing is redone
    stamp = (out / "pruned" / "model.safetensors").stat().st_mtime_ns
    again = compress(teacher, root / "packed", out, cfg, [judge_text], progress=False)
    assert (out / "pruned" / "model.safetensors").stat().st_mtime_ns == stamp and again["rows"] == report["rows"]

    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: {mlp: 0.5}\nquantize: {bits: 3}\n")
    with pytest.raises(SlmforgeError, match=r"bad.yaml:2"):
        load_compress_recipe(bad)
    assert load_compress_recipe("prune-heal-int8").quantize.bits == 8
    assert load_compress_recipe("int4").prune is None


def test_on_policy_batches_distil_on_the_students_own_tokens(world, tmp_path):
    from slmforge.train.kd import student_continue

    root, tok, teacher = world
    model = ModelDir.open(teacher).load_model()
    x = torch.randint(3, 300, (3, 12))
    torch.manual_seed(0)
    xs = student_continue(model, x, 6, 300)
    assert torch.equal(xs[:, :6], x[:, :6]) and not torch.equal(xs[:, 6:], x[:, 6:]) and int(xs.max()) < 300
    torch.manual_seed(0)
    assert torch.equal(student_continue(model, x, 6, 300), xs)  # the sampling follows torch's seed

    run = pretrain(root / "packed", tmp_path / "gkd", ModelConfig(**STUDENT), tok, PretrainConfig(max_steps=4, **FAST),
                   teacher=teacher, kd=DistillConfig(loss="jsd", lmbda=1.0))
    assert ModelDir.open(run).meta["distill"]["kd"]["lmbda"] == 1.0
    losses = [r["loss"] for r in read_metrics(tmp_path / "gkd" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 4 and all(0 < v < 50 for v in losses)
    with pytest.raises(ConfigError, match="lmbda"):
        DistillConfig(lmbda=0.5, top_k=4, cache=str(tmp_path / "c"))


def test_topk_cache_survives_a_kill_while_growing_and_reserves_disk_before_writing(tmp_path):
    key = {"batch_size": 2, "seq_len": 4, "k": 3}
    class Teacher(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return (torch.randn(*x.shape, 10),)

    teacher = Teacher()
    cache = TopKCache(tmp_path / "c", key)
    x = torch.zeros(2, 4, dtype=torch.long)
    cache.lookup(0, x, teacher, 10)
    # a kill between growing values.f16 and filled.u8: the data files are longer than filled says
    with open(tmp_path / "c" / "values.f16", "ab") as f:
        f.truncate(f.tell() * 4)
    again = TopKCache(tmp_path / "c", key)
    assert again.filled_batches == 1
    v, i = again.lookup(0, x, teacher, 10)
    assert v.shape == (2, 4, 3) and i.shape == (2, 4, 3)
    # the batch written is backed by real blocks (posix_fallocate), not a sparse hole
    st = (tmp_path / "c" / "indices.i32").stat()
    assert st.st_blocks * 512 >= 2 * 4 * 3 * 4
    # a shorter data file than filled says is still refused
    with open(tmp_path / "c" / "indices.i32", "r+b") as f:
        f.truncate(8)
    with pytest.raises(SlmforgeError, match="corrupt top-k cache"):
        TopKCache(tmp_path / "c", key)
