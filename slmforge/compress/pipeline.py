"""`slmforge compress`: prune -> heal by distillation -> quantize, and the compression report.

    slmforge compress MODEL --data PACKED --out runs/compressed [--recipe prune-heal-int8] [--judge-text FILE]

Each stage writes its own model directory under OUT (pruned/, healed/, quantized/) and is skipped when a
rerun finds it finished, so an interrupted run resumes (healing resumes from its last checkpoint, as any
pretraining does). The recipe is a YAML of CompressConfig (bundled: slmforge/recipes/compress/*.yaml); a
stage whose section is null is left out (no pruning: heal nothing, quantize the original).

The report (OUT/report.json, report.md, report.png) measures every variant the same way, relative to the
original: parameters, weights on disk (what a deployment loads: the integer file plus the float tensors it
leaves for a quantized directory), peak resident memory of a fresh process that loads the directory and
decodes, greedy decode tokens/s for one stream and for 16 together (our engine, `threads` threads), and bits
per byte on the given real text.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pydantic import with_config

from slmforge.compress.prune import PruneConfig, prune_dir
from slmforge.compress.quantize import QuantizeConfig, quantize_dir, weights_bytes
from slmforge.errors import SlmforgeError
from slmforge.io import file_sha256, read_json, write_json
from slmforge.modeldir import ModelDir
from slmforge.stage_config import STRICT, build, read_yaml, setting
from slmforge.train.kd import DistillConfig
from slmforge.train.pretrain import PretrainConfig

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes" / "compress"


@with_config(STRICT)
@dataclass
class CompressConfig:
    """The stages of `slmforge compress` (each the same config as its own command) and the report's settings."""

    prune: PruneConfig | None = setting(factory=lambda: PruneConfig(mlp=0.5, heads=0.75, hidden=0.75),
                                        help="slmforge prune's settings (null: no pruning).")
    heal: PretrainConfig | None = setting(factory=lambda: PretrainConfig(max_steps=200, lr=1e-3, eval_every=0),
                                          help="The healing run: slmforge distill pretrain's settings (null: none).")
    kd: DistillConfig = setting(factory=lambda: DistillConfig(alpha=0.5), help="The healing run's distillation loss.")
    quantize: QuantizeConfig | None = setting(factory=QuantizeConfig, help="slmforge quantize's settings (null: none).")
    judge_docs: int = setting(400, "Documents of each judge text scored for bits/byte.")
    decode_tokens: int = setting(64, "Tokens generated per stream when timing decode.")
    decode_batch: int = setting(16, "Streams decoded together for the batched figure.")
    threads: int = setting(2, "Threads for the decode timing and the memory figure.")
    val_batches: int = setting(20, "Batches (8 x 256 tokens) of the packed data's validation split scored for "
                                   "each variant's val loss, the LM's task metric (0: none).")


def load_compress_recipe(name_or_path: str | Path | None) -> CompressConfig:
    """A CompressConfig from a YAML path or a bundled recipe's name (None: the defaults)."""
    if name_or_path is None:
        return CompressConfig()
    p = Path(name_or_path)
    if not p.is_file():
        p = RECIPE_DIR / f"{p.name.removesuffix('.yaml')}.yaml"
    if not p.is_file():
        names = ", ".join(sorted(f.stem for f in RECIPE_DIR.glob("*.yaml")))
        raise SlmforgeError(f"{name_or_path}: no such compress recipe (bundled: {names})")
    return build(CompressConfig, read_yaml(p) or {}, p)


def _finished(d: Path) -> bool:
    return (d / "slmforge.json").is_file() and (d / "model.safetensors").is_file()


def compress(model: str | Path, data: str | Path, out: str | Path, cfg: CompressConfig,
             judge_text: list[str | Path] = (), progress: bool = True) -> dict:
    """Run the stages into out/ and write the report; returns the report's dict."""
    from slmforge.train.pretrain import pretrain

    src, out = ModelDir.open(model), Path(out)
    for f in judge_text:  # bad input fails before hours of work
        if not Path(f).is_file():
            raise SlmforgeError(f"{f}: no such judge text file")
    if src.meta.get("quantization"):
        raise SlmforgeError(f"{src.path}: already quantized; compress the float model")
    if cfg.prune is not None:
        from slmforge.data.pack import read_index

        if read_index(data).get("tokenizer_fingerprint") != src.load_tokenizer().fingerprint():
            raise SlmforgeError(f"{data}: packed with another tokenizer than {src.path}'s")
    out.mkdir(parents=True, exist_ok=True)
    variants: list[tuple[str, Path]] = [("original", src.path)]
    current = src.path
    if cfg.prune is not None:
        pruned = out / "pruned"
        if not _finished(pruned):
            _say(progress, f"pruning {src.path} -> {pruned}")
            prune_dir(src.path, data, pruned, cfg.prune)
        variants.append(("pruned", pruned))
        current = pruned
        if cfg.heal is not None:
            heal_cfg = PretrainConfig(**{**asdict(cfg.heal), "progress": progress})
            healed = out / "healed" / "model"
            if not _finished(healed):
                _say(progress, f"healing {pruned} by distillation from {src.path}")
                pretrain(data, out / "healed", ModelDir.open(pruned).config, src.load_tokenizer(), heal_cfg,
                         init=pruned, teacher=src.path, kd=cfg.kd)
            variants.append(("healed", healed))
            current = healed
    if cfg.quantize is not None:
        quantized = out / "quantized"
        if not _finished(quantized):
            _say(progress, f"quantizing {current} to {cfg.quantize.bits} bits")
            quantize_dir(current, quantized, cfg.quantize)
        variants.append((f"int{cfg.quantize.bits}", quantized))
    # a rerun measures only what changed: a variant whose weights and measuring settings are as in the
    # last report keeps its row
    settings = {"judge_text": [str(f) for f in judge_text], "judge_docs": cfg.judge_docs, "threads": cfg.threads,
                "decode_tokens": cfg.decode_tokens, "decode_batch": cfg.decode_batch, "data": str(data),
                "val_batches": cfg.val_batches}
    last = read_json(out / "report.json") if (out / "report.json").is_file() else {}
    kept = {r["model"]: r for r in last.get("rows", []) if last.get("measured_with") == settings}
    rows = []
    for name, d in variants:
        sha = file_sha256(d / "model.safetensors")
        if kept.get(str(d), {}).get("weights_sha256") == sha:
            rows.append({k: v for k, v in kept[str(d)].items() if not k.endswith("_vs_original")})
            continue
        _say(progress, f"measuring {name} ({d})")
        rows.append({"variant": name, "model": str(d), "weights_sha256": sha, **measure(d, cfg, judge_text, data)})
    base = rows[0]
    for r in rows:
        for k in ("params", "weights_mb", "peak_rss_mb", "tokens_per_s", "batched_tokens_per_s"):
            r[f"{k}_vs_original"] = round(r[k] / base[k], 4)
        if r.get("val_loss") is not None and base.get("val_loss") is not None:
            r["val_loss_change_pct"] = round(100 * (r["val_loss"] / base["val_loss"] - 1), 2)
        for i, f in enumerate(r["bits_per_byte"]):
            f["change_pct"] = round(100 * (f["bits_per_byte"] / base["bits_per_byte"][i]["bits_per_byte"] - 1), 2)
    report = {"model": str(src.path), "data": str(data), "config": asdict(cfg), "measured_with": settings, "rows": rows,
              "env": {"torch": torch.__version__, "threads": cfg.threads}}
    write_json(out / "report.json", report)
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")
    report_png(report, out / "report.png")
    return report


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# measuring one variant

_RSS_SCRIPT = """
import resource, sys, torch
torch.set_num_threads(int(sys.argv[2]))
from slmforge.modeldir import ModelDir
from slmforge.infer.engine import generate_ids, SamplingParams
m = ModelDir.open(sys.argv[1]).load_model()
list(generate_ids(m, [1] + list(range(5, 20)), SamplingParams(max_new_tokens=int(sys.argv[3]), temperature=0)))
try:  # VmHWM: ru_maxrss can carry the high-water mark of the parent that forked this process
    print(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
except (OSError, IndexError):
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mb(model_dir: str | Path, threads: int, n_new: int = 64) -> float:
    """Peak resident memory (MB) of a fresh process that loads the directory and decodes n_new tokens."""
    run = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(model_dir), str(threads), str(n_new)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SlmforgeError(f"{model_dir}: measuring memory failed: {run.stderr.strip().splitlines()[-1:]}")
    return int(run.stdout.strip().splitlines()[-1]) / 1024


def decode_tokens_per_s(model_dir: str | Path, n_new: int, batch: int, threads: int) -> tuple[float, float]:
    """Greedy decode tokens/s of our batch engine for one stream and for `batch` streams together (best of 3)."""
    from slmforge.infer.engine import BatchEngine, Request, SamplingParams, run

    torch.set_num_threads(threads)
    model = ModelDir.open(model_dir).load_model()
    vocab = model.config.vocab_size
    prompt = [(7 * i) % (vocab - 5) + 5 for i in range(16)]
    greedy = SamplingParams(max_new_tokens=n_new, temperature=0)

    def timed(prompts: list[list[int]]) -> float:
        best = float("inf")
        for _ in range(4):  # the first builds the decode copy and times kernels: not counted
            engine = BatchEngine(model, max_batch=len(prompts), max_len=len(prompt) + n_new)
            for p in prompts:
                engine.add(Request(p, greedy))
            t0 = time.perf_counter()
            list(run(engine))
            best = min(best, time.perf_counter() - t0)
        return len(prompts) * n_new / best

    with torch.no_grad():
        return timed([prompt]), timed([prompt[:8 + i % 8] for i in range(batch)])


def data_val_loss(model_dir: str | Path, data: str | Path, batches: int, batch_size: int = 8,
                  seq_len: int = 256) -> float | None:
    """Mean next-token loss on the first `batches` fixed windows of the packed data's val split (the windows
    pretraining evaluates on); None without a val split. A quantized directory is scored through its
    dequantized floats: the same weights its int kernels multiply."""
    from slmforge.data.pack import TokenShards

    val = TokenShards(data, "val")
    md = ModelDir.open(model_dir)
    seq_len = min(seq_len, md.config.max_position_embeddings, len(val) - 1)
    if batches < 1 or seq_len < 2:
        return None
    model = md.load_model().eval()
    with torch.no_grad():
        losses = [float(model(x, y)[1]) for x, y in val.iter_eval_batches(batch_size, seq_len, batches)]
    return round(sum(losses) / len(losses), 4) if losses else None


def measure(model_dir: str | Path, cfg: CompressConfig, judge_text: list[str | Path],
            data: str | Path | None = None) -> dict:
    from slmforge.evaluate.perplexity import judge

    md = ModelDir.open(model_dir)
    single, batched = decode_tokens_per_s(model_dir, cfg.decode_tokens, cfg.decode_batch, cfg.threads)
    bpb = judge(model_dir, list(judge_text), max_docs=cfg.judge_docs)["files"] if judge_text else []
    return {"params": md.config.n_params, "weights_mb": round(weights_bytes(model_dir) / 1e6, 3),
            "peak_rss_mb": round(peak_rss_mb(model_dir, cfg.threads, cfg.decode_tokens), 1),
            "tokens_per_s": round(single, 1), "batched_tokens_per_s": round(batched, 1),
            "val_loss": data_val_loss(model_dir, data, cfg.val_batches) if data is not None else None,
            "bits_per_byte": [{"file": f["file"], "bits_per_byte": round(f["bits_per_byte"], 4)} for f in bpb]}


# ---------------------------------------------------------------------------------------------------------
# the report


def report_markdown(report: dict) -> str:
    files = [Path(f["file"]).name for f in report["rows"][0]["bits_per_byte"]]
    head = ["variant", "params", "weights MB", "peak RSS MB", "tok/s x1", f"tok/s x{report['config']['decode_batch']}",
            "val loss", *[f"bits/byte {f}" for f in files]]
    lines = [f"# Compression report: {report['model']}", "",
             f"Decode at {report['env']['threads']} threads, greedy, {report['config']['decode_tokens']} tokens "
             "per stream; val loss on the packed data's validation windows; each figure is followed by its ratio "
             "(or change) to the original.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        cells = [r["variant"], f"{r['params']:,} ({r['params_vs_original']:.2f})",
                 f"{r['weights_mb']:.2f} ({r['weights_mb_vs_original']:.2f})",
                 f"{r['peak_rss_mb']:.0f} ({r['peak_rss_mb_vs_original']:.2f})",
                 f"{r['tokens_per_s']:.0f} ({r['tokens_per_s_vs_original']:.2f})",
                 f"{r['batched_tokens_per_s']:.0f} ({r['batched_tokens_per_s_vs_original']:.2f})",
                 (f"{r['val_loss']:.4f} ({r.get('val_loss_change_pct', 0):+.2f}%)" if r.get("val_loss") is not None
                  else "n/a"),
                 *[f"{f['bits_per_byte']:.4f} ({f['change_pct']:+.2f}%)" for f in r["bits_per_byte"]]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_png(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("params_vs_original", "params"), ("weights_mb_vs_original", "weights on disk"),
            ("peak_rss_mb_vs_original", "peak memory"), ("tokens_per_s_vs_original", "decode x1"),
            ("batched_tokens_per_s_vs_original", "decode x16")]
    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([j + i * width for j in range(len(keys))], [r[k] for k, _ in keys], width, label=r["variant"])
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(keys))], [label for _, label in keys])
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("relative to the original")
    ax.set_title(Path(report["model"]).name + ": compression")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)

