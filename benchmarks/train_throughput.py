#!/usr/bin/env python
"""Training throughput and MFU of slmforge models on this machine (CPU).

For each preset and precision it runs the shared trainer, `slmforge.train.loop.train()` (autocast to
bf16 with fp32 weights, fused AdamW, grad clipping at 1.0), on random tokens and reads the time of every
optimizer step from its metrics. It reports tokens/s, achieved TFLOP/s and MFU. FLOPs per token are the
model's own `ModelConfig.flops_per_token(seq_len)` (6N + attention, PaLM appendix B). The peak is
measured in the same run with large square `torch.mm`s of each precision on the same thread count, once
before and once after the training runs; the better of the two is the peak, and the gap between them
hints at noise.

    python benchmarks/train_throughput.py                      # 260k and 15m, bf16 and fp32
    python benchmarks/train_throughput.py --default-malloc     # glibc's default malloc (about 2x slower for 15m)
    python benchmarks/train_throughput.py --presets 15m --precisions bf16 --profile
    python benchmarks/train_throughput.py --compile            # torch.compile the model (inductor)
    python benchmarks/train_throughput.py --device cuda --presets 15m --precisions bf16 --compile  # a GPU

Results go to benchmarks/results/train_throughput.json (gitignored).

Noise: on a shared, virtualised 2-core machine timings move a lot. Each row carries the median and best
step time, the spread, the share of the machine other processes used while it was timed ("other load"),
and the page faults per step; --wait-quiet S waits (up to S seconds) for other processes to go quiet
before each measurement. Distrust rows with other load above a few percent, and repeat a run before
trusting a difference of less than ~10%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from slmforge.config import ModelConfig, preset
from slmforge.model import LlamaModel
from slmforge.train.loop import TrainConfig, keep_freed_memory, train

DEFAULT_PRESETS = ("260k", "15m")
PRECISIONS = ("bf16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Per preset: (seq_len, batch). llama2.c's sequence lengths; 15m at batch 16 is the trainer's default
# (tokens/s is flat from 8 to 32), 260k needs a larger batch to amortise its per-op overhead.
DEFAULTS = {"260k": (512, 32), "15m": (256, 16)}
FALLBACK = (256, 8)
PEAK_SIZES = (1024, 2048, 4096)
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "train_throughput.json"



# --------------------------------------------------------------------------------------------- peak


def measure_peak_tflops(dtype: torch.dtype, sizes: tuple[int, ...], repeats: int = 5,
                        device: str = "cpu") -> dict[str, float]:
    """Best-of-`repeats` TFLOP/s of an n×n @ n×n torch.mm for each n (2 warmup calls each)."""
    out: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        for _ in range(2):
            torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync()
            best = min(best, time.perf_counter() - t0)
        out[str(n)] = 2 * n**3 / best / 1e12
    return out


# -------------------------------------------------------------------------------------------- noise


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine spent busy (steal included) since boot; None without /proc/stat."""
    try:
        vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = vals
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """While in the block: the share of the machine other processes used ((busy CPU - ours) / (wall ×
    CPUs), in %), and our own minor page faults and kernel time."""

    other_pct: float | None = None
    page_faults: int = 0
    sys_s: float = 0.0

    def __enter__(self) -> LoadMeter:
        self.busy0, self.ours0, self.wall0 = machine_busy_s(), time.process_time(), time.perf_counter()
        self.ru0 = resource.getrusage(resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc: object) -> None:
        busy1, ours, wall = machine_busy_s(), time.process_time() - self.ours0, time.perf_counter() - self.wall0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        self.page_faults = ru1.ru_minflt - self.ru0.ru_minflt
        self.sys_s = ru1.ru_stime - self.ru0.ru_stime
        if self.busy0 is not None and busy1 is not None and wall > 0:
            other = (busy1 - self.busy0) - ours
            self.other_pct = max(0.0, 100.0 * other / (wall * (os.cpu_count() or 1)))


def wait_for_quiet(max_wait_s: float, threshold_pct: float = 10.0, window_s: float = 2.0) -> float | None:
    """Sleep until other processes use less than `threshold_pct` of the machine over a `window_s` window,
    or `max_wait_s` has passed. Returns the last window's load (None when it cannot be measured)."""
    if max_wait_s <= 0:
        return None
    deadline = time.monotonic() + max_wait_s
    while True:
        with LoadMeter() as load:
            time.sleep(window_s)
        if load.other_pct is None or load.other_pct < threshold_pct or time.monotonic() >= deadline:
            return load.other_pct


# ---------------------------------------------------------------------------------------------- run


@dataclass
class RunResult:
    preset: str
    precision: str
    batch: int
    seq_len: int
    threads: int
    compile: bool
    device: str
    n_params: int
    flops_per_token: float
    step_times_s: list[float]
    first_step_s: float  # includes torch.compile with --compile
    final_loss: float
    other_load_pct: float | None  # CPU used by other processes while timing, % of the whole machine
    page_faults_per_step: float
    sys_s_per_step: float  # kernel CPU time per step (page faults, mostly)
    tokens_per_s: float = 0.0  # from the median step
    tokens_per_s_best: float = 0.0
    tflops: float = 0.0  # achieved, median step
    mfu: float = 0.0  # vs the measured peak of this precision
    mfu_vs_bf16_peak: float = 0.0
    spread_pct: float = 0.0  # (slowest - fastest) / median of the timed steps
    profile_by_op: list[dict] = field(default_factory=list)
    profile_by_shape: list[dict] = field(default_factory=list)


class StepHooks:
    """The `get_batch` handed to train(): the same random batch every step.

    train() asks for batch i at the start of step i (grad_accum 1, one process), so these calls mark the
    step boundaries: steps [warmup, warmup + steps) run inside a LoadMeter, the next `profile` steps
    under torch.profiler, and one step more closes the last window (its time is not used; the
    trainer's end-of-run checkpoint comes after it).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, warmup: int, steps: int, profile: int):
        self.x, self.y = x, y
        self.t_start, self.t_prof, self.t_end = warmup, warmup + steps, warmup + steps + profile
        self.total_steps = self.t_end + 1
        self.load = LoadMeter()
        self.prof: torch.profiler.profile | None = None
        if profile:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                               record_shapes=True)

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == self.t_start:
            self.load.__enter__()
        if i == self.t_prof:
            self.load.__exit__()
            if self.prof is not None:
                self.prof.start()
        if i == self.t_end and self.prof is not None:
            self.prof.stop()
        return self.x, self.y


def summarise_profile(prof: torch.profiler.profile, n_steps: int, top: int,
                      by_shape: bool) -> list[dict]:
    """Self CPU time per op (or per op and input shapes) per step, largest first, with % of the total."""
    rows = []
    for ev in prof.key_averages(group_by_input_shape=by_shape):
        if ev.self_cpu_time_total > 0:
            row = {"op": ev.key, "calls": ev.count / n_steps, "self_ms_per_step": ev.self_cpu_time_total / 1e3 / n_steps}
            if by_shape:
                row["shapes"] = str(ev.input_shapes)[:100]
            rows.append(row)
    rows.sort(key=lambda r: -r["self_ms_per_step"])
    total = sum(r["self_ms_per_step"] for r in rows)
    for r in rows:
        r["pct"] = 100.0 * r["self_ms_per_step"] / total if total else 0.0
    return rows[:top]


def run_one(name: str, precision: str, batch: int, seq_len: int, args: argparse.Namespace) -> RunResult:
    cfg: ModelConfig = preset(name)
    torch.manual_seed(0)
    model = LlamaModel(cfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)
    warmup = max(args.warmup, 1)
    hooks = StepHooks(x, y, warmup, args.steps, args.profile)
    tcfg = TrainConfig(
        max_steps=hooks.total_steps, batch_size=batch, seq_len=seq_len, precision=precision,
        compile=args.compile, eval_every=0, log_every=1, ckpt_every=0, device=args.device,
        threads=args.threads, keep_freed_memory=not args.default_malloc, progress=False,
    )
    wait_for_quiet(args.wait_quiet)
    with tempfile.TemporaryDirectory(prefix="slmforge-bench-") as out:
        result = train(model, hooks, tcfg, out, resume=False)
    # log_every=1: one metrics row per step, its tokens_per_s taken over that step alone
    step_s = [batch * seq_len / row["tokens_per_s"] for row in result.history]
    times = step_s[warmup:warmup + args.steps]
    load = hooks.load
    by_op = by_shape = []
    if hooks.prof is not None:
        by_op = summarise_profile(hooks.prof, args.profile, 20, by_shape=False)
        by_shape = summarise_profile(hooks.prof, args.profile, 15, by_shape=True)

    med = statistics.median(times)
    return RunResult(
        preset=name, precision=precision, batch=batch, seq_len=seq_len, threads=torch.get_num_threads(), device=args.device,
        compile=args.compile, n_params=cfg.n_params, flops_per_token=cfg.flops_per_token(seq_len),
        step_times_s=times, first_step_s=step_s[0],
        final_loss=result.history[warmup + args.steps - 1]["loss"], other_load_pct=load.other_pct,
        page_faults_per_step=load.page_faults / len(times), sys_s_per_step=load.sys_s / len(times),
        tokens_per_s=batch * seq_len / med, tokens_per_s_best=batch * seq_len / min(times),
        spread_pct=100.0 * (max(times) - min(times)) / med, profile_by_op=by_op, profile_by_shape=by_shape,
    )


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated preset names")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated: bf16, fp32")
    p.add_argument("--steps", type=int, default=6, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    p.add_argument("--batch", type=int, default=None, help="batch size for every preset (default: per preset)")
    p.add_argument("--seq", type=int, default=None, help="sequence length for every preset (default: per preset)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the peak is then the GPU's, measured the same way)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc malloc at its defaults (the trainer otherwise keeps freed memory; "
                        "see slmforge.train.loop.keep_freed_memory)")
    p.add_argument("--peak-sizes", default=",".join(map(str, PEAK_SIZES)), help="square matmul sizes for the peak")
    p.add_argument("--profile", type=int, nargs="?", const=2, default=0, metavar="N",
                   help="after the timed steps, profile N more (default 2) and print the top ops")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                   help="before each measurement wait up to S seconds for other processes to go quiet")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    args = p.parse_args(argv)
    for prec in args.precisions.split(","):
        if prec.strip() not in PRECISIONS:
            p.error(f"unknown precision {prec!r}; choose from {', '.join(PRECISIONS)}")
    if args.steps < 1 or args.profile < 0:
        p.error("--steps must be >= 1 and --profile >= 0")
    return args


def machine_info() -> dict:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")),
                 platform.processor())
    flags = next((set(ln.split(":", 1)[1].split()) for ln in cpuinfo if ln.startswith("flags")), set())
    return {
        "cpu": model, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "mkldnn": torch.backends.mkldnn.is_available(),
        "isa_flags": sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512_vnni"))),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def print_table(console: Console, results: list[RunResult], peaks: dict[str, float]) -> None:
    where = "GPU" if torch.cuda.is_available() and results and results[0].device.startswith("cuda") else "CPU"
    table = Table(title=f"Training throughput ({where}, {results[0].threads} threads; measured peak "
                        f"bf16 {peaks['bf16']:.3f}, fp32 {peaks['fp32']:.3f} TFLOP/s)")
    cols = ("preset", "prec", "batch×seq", "compile", "step s", "spread", "tokens/s", "best tok/s",
            "TFLOP/s", "MFU", "vs bf16 peak", "faults/step", "other load", "1st step s")
    for col in cols:
        table.add_column(col, justify="left" if col in ("preset", "prec") else "right")
    for r in results:
        table.add_row(
            r.preset, r.precision, f"{r.batch}×{r.seq_len}", "yes" if r.compile else "no",
            f"{statistics.median(r.step_times_s):.3f}", f"{r.spread_pct:.0f}%", f"{r.tokens_per_s:,.0f}",
            f"{r.tokens_per_s_best:,.0f}", f"{r.tflops:.3f}", f"{100 * r.mfu:.1f}%",
            f"{100 * r.mfu_vs_bf16_peak:.1f}%", f"{r.page_faults_per_step:,.0f}",
            "-" if r.other_load_pct is None else f"{r.other_load_pct:.0f}%", f"{r.first_step_s:.1f}",
        )
    console.print(table)


def print_profile(console: Console, r: RunResult) -> None:
    for rows, title, shapes in ((r.profile_by_op, "by op", False), (r.profile_by_shape, "by op and input shapes", True)):
        table = Table(title=f"Profile of train(): {r.preset} {r.precision} batch {r.batch}, "
                            f"self CPU time per step, {title}")
        cols = ("op", "input shapes", "calls", "ms/step", "%") if shapes else ("op", "calls", "ms/step", "%")
        for col in cols:
            table.add_column(col, justify="left" if col in ("op", "input shapes") else "right")
        for row in rows:
            cells = [row["op"]] + ([row["shapes"]] if shapes else [])
            table.add_row(*cells, f"{row['calls']:g}", f"{row['self_ms_per_step']:.1f}", f"{row['pct']:.1f}")
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)
    if args.threads:
        torch.set_num_threads(args.threads)
    # set before anything is allocated, as train() would (it only affects later allocations)
    kept = False if args.default_malloc else keep_freed_memory()
    presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    sizes = tuple(int(s) for s in args.peak_sizes.split(","))

    console.print(f"[bold]torch {torch.__version__}[/], {torch.get_num_threads()} threads"
                  f"{', glibc keeps freed memory' if kept else ''}; measuring the matmul peak ...")
    wait_for_quiet(args.wait_quiet)
    peak_runs = [{p: measure_peak_tflops(DTYPES[p], sizes, device=args.device) for p in PRECISIONS}]

    results: list[RunResult] = []
    for name in presets:
        seq_default, batch_default = DEFAULTS.get(name, FALLBACK)
        seq, batch = args.seq or seq_default, args.batch or batch_default
        for prec in precisions:
            console.print(f"  {name} {prec}, batch {batch}×{seq} ...")
            results.append(run_one(name, prec, batch, seq, args))

    wait_for_quiet(args.wait_quiet)
    peak_runs.append({p: measure_peak_tflops(DTYPES[p], sizes, device=args.device) for p in PRECISIONS})
    peaks = {p: max(max(run[p].values()) for run in peak_runs) for p in PRECISIONS}
    for r in results:
        r.tflops = r.tokens_per_s * r.flops_per_token / 1e12
        r.mfu = r.tflops / peaks[r.precision]
        r.mfu_vs_bf16_peak = r.tflops / peaks["bf16"]

    print_table(console, results, peaks)
    console.print("matmul TFLOP/s by size, before / after the runs: " + "; ".join(
        f"{p} " + ", ".join(f"{n}: {peak_runs[0][p][n]:.3f}/{peak_runs[1][p][n]:.3f}" for n in peak_runs[0][p])
        for p in PRECISIONS))
    for r in results:
        if r.profile_by_op:
            print_profile(console, r)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine_info(), "threads": torch.get_num_threads(), "keep_freed_memory": kept,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "peak_tflops": peaks, "peak_runs": peak_runs, "results": [asdict(r) for r in results],
    }
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
