"""The trainer core: AdamW, LR schedule, gradient accumulation, bf16 autocast, periodic eval, metrics,
atomic checkpoints with exact resume, and DDP or FSDP2 under torchrun. Pretrain, finetune and distill all
call `train()` with their own batches (and, for distill, their own loss).

Under torchrun (RANK/WORLD_SIZE set) the model is wrapped in DDP, or sharded with FSDP2
(torch.distributed.fsdp.fully_shard: each decoder block, then the root) when cfg.fsdp; gloo on CPU, NCCL on
GPU. Micro-batch i = (step * grad_accum + micro) * world + rank, so a step's global batch is the same
micro-batches whatever the world size, and with cfg.global_batch_size the accumulation is derived from it:
1 process x 4 micro-steps and 4 processes x 1 train on the same examples. Rank 0 logs and writes; the
checkpoint holds full (unsharded) state dicts, gathered and loaded with torch.distributed.checkpoint's
state_dict API (as litgpt saves FSDP runs), so a run resumes on another world size, or from DDP into FSDP.

Exact resume: everything a step depends on is either a pure function of the step number (the batches,
via get_batch(i); the learning rate, via lr_at(step)) or saved in the checkpoint (weights, AdamW moments
and step counters, RNG states). So a run killed at any point and resumed from its last checkpoint
produces bit-identical losses from there on.

    out_dir/metrics.jsonl           one JSON row per logged step (val_loss on evaluated steps)
    out_dir/checkpoints/last.pt     the latest checkpoint (replaced atomically)
    out_dir/checkpoints/best.pt     weights at the best value of cfg.best_metric (when set)

Time budget: with cfg.max_minutes set, train() times its own first steps before training (a few steps at
learning rate 0, whose AdamW state is then dropped, and one evaluation) and lowers max_steps to what fits
in the budget. The first steps can be faster than the steady state (fine-tuning batches differ in length,
caches warm up, another job starts), so the plan is made again from the measured wall time of the real
steps (evaluations and checkpoints included) when BUDGET_REPLAN_AT of the budget is spent, and a run that still reaches its
budget ends there with its final evaluation. The plan, with its re-plans, is kept in the checkpoint
(written right after each re-plan), so a resumed run keeps the same schedule. Resuming with
settings that change the schedule (batch, seq_len, lr, seed, max_steps, world size, ...) is refused unless
cfg.force_resume.

Early stopping: with cfg.best_metric set (val_loss, or a metric that on_eval returns such as
val_accuracy), the weights at its best evaluation are kept in best.pt and restored into the model when
training ends; with cfg.patience > 0, training stops after that many evaluations without improvement.
The best value and the count of evaluations without improvement live in last.pt, so resume stays exact.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import random
import re
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from slmforge.errors import ConfigError, SlmforgeError, first_line, os_error_behind
from slmforge.interrupt import StopRequest
from slmforge.io import atomic_write_text

Batch = Any  # a tuple/list (or dict) of tensors; the default loss reads (x, y)
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
# on_eval(step, val_loss) may return more validation metrics ({"val_accuracy": 0.9}) for the metrics row.
OnEval = Callable[[int, float], "dict[str, float] | None"]

SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
WSD_DECAY_FRACTION = 0.2  # warmup-stable-decay: the last 20% of steps decay to min_lr
BUDGET_PROBE_STEPS = 8  # steps timed for max_minutes: the first 2 warm up, the lower quartile of the rest counts
STEP_OVERHEAD = 1.05  # logging and checkpoints on top of the timed step
BUDGET_REPLAN_AT = (0.1, 0.3, 0.6)  # shares of the time budget spent when the plan is made again from wall time
# Settings that may change on resume without changing what is trained (the rest must match, or force_resume).
RESUME_FREE = ("progress", "threads", "device", "keep_freed_memory", "log_every", "ckpt_every", "compile",
               "force_resume", "eval_every", "eval_batches", "best_metric", "best_mode", "patience")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    max_minutes: float | None = None  # time budget: max_steps is lowered to what fits (timed at the start and as it runs)
    batch_size: int = 16  # per rank, per micro-step
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    warmup_fraction: float | None = None  # warmup as a share of the (budgeted) max_steps; replaces warmup_steps
    schedule: str = "cosine"  # cosine | wsd | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    precision: str = "auto"  # bf16 = autocast to bfloat16 (weights and optimizer stay fp32); auto: see resolve_precision
    compile: bool = False
    eval_every: int = 200  # 0: only at the end
    eval_batches: int = 20
    log_every: int = 10
    ckpt_every: int = 200  # 0: only at the end (and on interrupt)
    seed: int = 0
    device: str = "auto"  # auto = cuda if available, else cpu
    threads: int | None = None  # torch.set_num_threads
    keep_freed_memory: bool = True  # CPU: glibc keeps freed memory (see keep_freed_memory); ~2x for 15M
    progress: bool = True
    best_metric: str | None = None  # keep (and restore at the end) the weights where this val metric is best
    best_mode: str = "min"  # min for losses, max for accuracies
    patience: int = 0  # stop after this many evaluations without improvement of best_metric (0: never)
    force_resume: bool = False  # resume even where settings that change the schedule differ from the checkpoint's
    global_batch_size: int | None = None  # sequences per optimizer step, all ranks: sets grad_accum for the world size
    fsdp: bool = False  # under torchrun: shard weights, gradients and AdamW state with FSDP2 instead of DDP

    def __post_init__(self) -> None:
        checks = [
            (self.max_steps > 0, "max_steps must be positive"),
            (self.batch_size > 0 and self.grad_accum > 0 and self.seq_len > 0,
             "batch_size, grad_accum and seq_len must be positive"),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, "need lr > 0 and 0 <= min_lr <= lr"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.warmup_fraction is None or 0 <= self.warmup_fraction < 1, "warmup_fraction must be in [0, 1)"),
            (self.max_minutes is None or self.max_minutes > 0, "max_minutes must be > 0"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "betas must be in [0, 1)"),
            (self.grad_clip >= 0 and self.weight_decay >= 0, "grad_clip and weight_decay must be >= 0"),
            (self.eval_every >= 0 and self.ckpt_every >= 0 and self.log_every > 0,
             "eval_every/ckpt_every must be >= 0 and log_every > 0"),
            (self.threads is None or self.threads > 0, "threads must be positive"),
            (self.best_mode in ("min", "max"), "best_mode must be min or max"),
            (self.patience >= 0, "patience must be >= 0"),
            (self.patience == 0 or self.best_metric, "patience (early stopping) needs best_metric"),
            (self.global_batch_size is None or self.global_batch_size > 0, "global_batch_size must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"train config: {msg}")


@dataclass
class TrainResult:
    step: int
    tokens: int  # seen in total, all ranks
    loss: float | None  # last logged train loss
    val_loss: float | None  # last evaluated
    tokens_per_s: float  # training throughput over the whole run (eval and checkpoint time excluded)
    train_time_s: float
    elapsed_s: float
    resumed_from: int | None
    out_dir: Path
    history: list[dict] = field(default_factory=list, repr=False)  # this process's metric rows
    best_step: int | None = None  # step of the best cfg.best_metric; the model holds those weights
    best_value: float | None = None
    stopped_early: bool = False
    plan: dict | None = None  # max_minutes: the timed step and evaluation, and the max_steps they fixed
    # FSDP only, rank 0: the trained (or best) weights as a full state dict. The model passed in stays
    # sharded, so the caller builds a plain one from this to save.
    full_state: dict | None = field(default=None, repr=False)


class TrainingInterrupted(SlmforgeError):
    """Ctrl-C / SIGTERM: a checkpoint was saved; running the same command again resumes."""


# ---------------------------------------------------------------------------------------------------------
# Pieces


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for update number `step` (0-based): linear warmup, then cosine / WSD / constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))
    decay_start = max(cfg.warmup_steps, int(cfg.max_steps * (1 - WSD_DECAY_FRACTION)))
    if step < decay_start:
        return cfg.lr
    frac = min(1.0, (step - decay_start + 1) / max(1, cfg.max_steps - decay_start))
    return cfg.lr + (cfg.min_lr - cfg.lr) * frac


def clip_grad_norm(model: nn.Module, max_norm: float, sharded: bool = False) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most max_norm (0: no clipping); returns the norm.

    The squares are summed in float64: an fp32 sum over millions of elements is off by ~1e-5 relative
    depending on how it is split, and FSDP splits it by shard, so the clip factor, and with it the whole run,
    would drift from the same run on one process (measured: 1.3e-4 in loss after 50 steps; in float64, none).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP: this rank's shard
    dev = local[0].device if local else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float64, device=dev)
    for g in local:
        squares += torch.linalg.vector_norm(g, dtype=torch.float64).square()
    if sharded:
        dist.all_reduce(squares)
    norm = squares.sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0).float()
        for g in local:
            g.mul_(scale.to(g.dtype))
    return norm.float()


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices decay, 1-D tensors (norm weights, biases) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    try:  # one fused kernel for all parameters where the device has it (CUDA, CPU)
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=device.type == "cuda", **kw)


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch[0], batch[1]
    return model(x, y)[1]


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by torchrun; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def with_world(cfg: TrainConfig, world: int) -> TrainConfig:
    """cfg with grad_accum derived from global_batch_size for this many ranks (unchanged without it)."""
    if cfg.global_batch_size is None:
        return cfg
    per_pass = cfg.batch_size * world
    if cfg.global_batch_size % per_pass:
        raise ConfigError(f"train config: global_batch_size {cfg.global_batch_size} is not a multiple of "
                          f"batch_size {cfg.batch_size} x {world} process{'es' if world > 1 else ''}")
    return replace(cfg, grad_accum=cfg.global_batch_size // per_pass)


def sequences_per_step(batch_size: int, grad_accum: int, global_batch_size: int | None) -> int:
    """Sequences (or examples) one optimizer step consumes, all ranks together: what an epoch is divided by."""
    return global_batch_size or batch_size * grad_accum * dist_env()[1]


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX). Without them oneDNN emulates
    bf16 matmuls: 0.9 GFLOP/s against fp32's 92 on a 2-core AVX2 EPYC (measured), a 25x slower training step."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: assume none (fp32 is never the slow choice there)
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """auto -> bf16 where the hardware computes in bf16 (a CUDA GPU that supports it, a CPU with AVX512-BF16
    or AMX), else fp32. An explicit bf16 or fp32 is kept."""
    if precision != "auto":
        return precision
    kind = torch.device(device).type if str(device) != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if kind == "cpu" and cpu_has_bf16() else "fp32"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SlmforgeError("device cuda requested but no CUDA GPU is available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def _to_device(batch: Batch, device: torch.device) -> Batch:
    nb = device.type == "cuda"
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=nb)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _n_tokens(batch: Batch) -> int:
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return first.numel()


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temp file, fsync, rename: a kill mid-write leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        err = os_error_behind(e)  # torch.save turns a failed write (a full disk) into a RuntimeError
        if err is None:
            raise
        raise SlmforgeError(f"{path}: cannot write the checkpoint ({err.strerror or err}); the previous one is "
                            f"kept") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_checkpoint_temps(folder: Path) -> None:
    """Temp files of checkpoints a SIGKILL cut short (checkpoint-sized, never read again)."""
    for stale in folder.glob(".*.pt.*.tmp"):
        stale.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict:
    try:
        # Our own file; it holds numpy/python RNG states, which weights_only=True rejects.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SlmforgeError(f"{path}: unreadable checkpoint ({first_line(e)}); "
                            f"delete it to start over") from None


def _full(load: bool = False, world: int = 1):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if load:  # rank 0 holds the state and sends each rank its part (its shard, under FSDP)
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=world > 1)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets it all, on the CPU


def full_model_state(model: nn.Module) -> dict:
    """The model's full state dict on rank 0's CPU ({} on other ranks); under FSDP a collective (every rank
    must call it). Keys are the plain module's, whatever the wrapping."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full())


def full_train_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts as full_model_state; AdamW's state keyed by parameter name, so it
    loads into another world size or another wrapping (DDP, FSDP, none)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return full_model_state(model), get_optimizer_state_dict(model, optimizer, options=_full())


def load_model_state(model: nn.Module, state: dict, world: int = 1) -> None:
    """Load a full state dict held by rank 0 (others pass {}) into a plain, DDP or FSDP model."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full(load=True, world=world))


def load_train_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict,
                     world: int = 1) -> None:
    """load_model_state, and AdamW's state. Checkpoints written before state was keyed by name (by position
    in optimizer.state_dict()) are converted: make_optimizer's parameter order is fixed."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if any(isinstance(i, int) for g in optim_state.get("param_groups", []) for i in g["params"]):
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        optim_state = {"state": {order[i]: v for i, v in optim_state["state"].items()},
                       "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                                        for g in optim_state["param_groups"]]}
    load_model_state(model, model_state, world)
    set_optimizer_state_dict(model, optimizer, optim_state, options=_full(load=True, world=world))


def shard_model(model: nn.Module, device: torch.device) -> None:
    """FSDP2 in place: each decoder block is its own unit (its weights gathered just before its forward and
    freed after), the root holds the rest (embeddings, final norm, head). The mesh spans all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from slmforge.model import Block

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for m in model.modules():
        if isinstance(m, Block):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _broadcast_object(obj: Any, world: int) -> Any:
    """Rank 0's obj on every rank (small picklable values: flags, counters, RNG states)."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (killed mid-write) is skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep rows up to the checkpoint step, so a resumed curve has no duplicate or orphan steps."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def keep_freed_memory(limit: int = 2**31 - 1) -> bool:
    """Make glibc malloc serve big blocks from its heap and keep freed memory instead of unmapping it.

    By default glibc mmaps every block above its mmap threshold (at most 32 MiB) and munmaps it on
    free, so every CPU training step faults in (and the kernel zeroes) fresh pages for the logits,
    their fp32 copy and their gradients: for the 15M preset at batch 16x256 about 650k page faults per
    step, which halves throughput (benchmarks/train_throughput.py). Same as starting Python with
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=2147483647.
    The cost: the process keeps its peak memory until it exits. Returns whether both settings took
    (False where libc is not glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
        return bool(libc.mallopt(m_mmap_threshold, limit)) and bool(libc.mallopt(m_trim_threshold, limit))
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------------------
# The loop


def train(
    model: nn.Module,
    get_batch: Callable[[int], Batch],
    cfg: TrainConfig,
    out_dir: str | Path,
    eval_batches: Callable[[], Iterable[Batch]] | None = None,
    on_eval: OnEval | None = None,
    loss_fn: LossFn | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train `model` in place for cfg.max_steps optimizer steps.

    get_batch(i) returns micro-batch number i = (step * grad_accum + micro) * world_size + rank, a
      deterministic function of i (that is what makes resume exact). Default batches are (x, y) with
      y = -100 where no loss is wanted.
    eval_batches() yields the validation batches of this rank (the same ones every time).
    on_eval(step, val_loss) is called on every rank after each evaluation; it may return a dict of more
      validation metrics, which go into the metrics row (and can be cfg.best_metric).
    loss_fn(model, batch) -> scalar loss; default: model(x, y)[1]. Called under autocast.
    resume: continue from out_dir/checkpoints/last.pt when it exists; False starts over (deleting it).
    """
    rank, world, local_rank = dist_env()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device, local_rank)
    if device.type == "cpu" and cfg.keep_freed_memory:
        keep_freed_memory()
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))
    cfg = with_world(cfg, world)
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SlmforgeError("this GPU has no bfloat16 support; use precision fp32")
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(model, get_batch, cfg, Path(out_dir), eval_batches, on_eval, loss_fn or default_loss,
                      resume, device, rank, world)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(model, get_batch, cfg, out, eval_batches, on_eval, loss_fn, resume, device, rank, world):
    from rich.console import Console

    master = rank == 0
    console = Console(stderr=True, quiet=not (master and cfg.progress))
    ckpt_path = out / "checkpoints" / "last.pt"
    best_path = out / "checkpoints" / "best.pt"
    metrics_path = out / "metrics.jsonl"
    if master:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_checkpoint_temps(ckpt_path.parent)

    fsdp = cfg.fsdp and world > 1
    if cfg.fsdp and world == 1:
        console.print("[yellow]fsdp: one process, nothing to shard; training unsharded")
    model.to(device)
    if fsdp:
        shard_model(model, device)
    optimizer = make_optimizer(model, cfg, device)
    step, tokens, elapsed0, train_time = 0, 0, 0.0, 0.0
    last_loss = last_val = None
    resumed_from = None
    # Early stopping state: best value of cfg.best_metric, its step, evaluations since it improved.
    best = {"value": None, "step": None, "bad_evals": 0}
    stopped_early = False
    requested = asdict(cfg)  # what was asked for: kept in the checkpoint, compared on resume
    plan = None
    # Rank 0 reads the checkpoint and sends it to the others, so they need not see its disk.
    has_ckpt = _broadcast_object(resume and master and ckpt_path.is_file(), world)
    if has_ckpt:
        ck = load_checkpoint(ckpt_path) if master else {}
        ck_meta = _broadcast_object({k: v for k, v in ck.items() if k not in ("model", "optimizer")}, world)
        _check_resume(ck_meta, requested, world, ckpt_path, console)
        try:
            load_train_state(model, optimizer, ck.get("model", {}), ck.get("optimizer", {}), world)
        except (RuntimeError, ValueError, KeyError) as e:
            raise SlmforgeError(f"{ckpt_path}: does not match this model/optimizer ({first_line(e)}); "
                                f"use another output folder, or start over without resuming") from None
        ck = ck_meta
        _set_rng_state(ck["rng"])
        step, tokens, elapsed0, train_time = ck["step"], ck["tokens"], ck["elapsed"], ck["train_time"]
        last_loss, last_val = ck.get("loss"), ck.get("val_loss")
        best, stopped_early = ck.get("best", best), ck.get("stopped_early", False)
        resumed_from, plan = step, ck.get("plan")
        saved_by = ck.get("world_size", 1)
        console.print(f"resuming from {ckpt_path} at step {step}"
                      + (f" (saved by {saved_by} processes, now {world})" if saved_by != world else ""))
        if master:
            _truncate_metrics(metrics_path, step)
    else:
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        if master:  # a fresh run: a fresh curve, and no stale checkpoint to resume into later
            metrics_path.unlink(missing_ok=True)
            ckpt_path.unlink(missing_ok=True)
            best_path.unlink(missing_ok=True)

    raw_model = model
    run_model: nn.Module = torch.compile(model) if cfg.compile else model
    if world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run_model = DDP(run_model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    accum = cfg.grad_accum

    def forward_backward(step: int) -> tuple[torch.Tensor, int]:
        """The micro-steps of optimizer step `step`: summed loss and tokens; gradients accumulated."""
        loss_sum = torch.zeros((), device=device)
        step_tokens = 0
        for micro in range(accum):
            batch = _to_device(get_batch((step * accum + micro) * world + rank), device)
            if world > 1 and accum > 1:  # reduce gradients across ranks only on the last micro-step
                if fsdp:
                    raw_model.set_requires_gradient_sync(micro == accum - 1)
                else:
                    run_model.require_backward_grad_sync = micro == accum - 1
            with autocast:
                loss = loss_fn(run_model, batch)
            (loss / accum).backward()
            loss_sum += loss.detach()
            step_tokens += _n_tokens(batch)
        return loss_sum, step_tokens

    def optimizer_step() -> torch.Tensor:
        grad_norm = clip_grad_norm(raw_model, cfg.grad_clip, fsdp)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def evaluate() -> float | None:
        raw_model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of batch losses, batches)
        batches, extra = eval_batches(), 0
        if fsdp:  # each forward gathers weights from every rank: all must run as many as the busiest one
            batches = list(batches)
            most = torch.tensor([len(batches)], device=device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            extra = int(most.item()) - len(batches)
        with torch.no_grad(), autocast:
            for batch in batches:
                total[0] += loss_fn(raw_model, _to_device(batch, device)).double()
                total[1] += 1
            for _ in range(extra):  # not counted
                loss_fn(raw_model, _to_device(get_batch(0), device))
        raw_model.train()
        if world > 1:
            dist.all_reduce(total)
        return (total[0] / total[1]).item() if total[1] > 0 else None

    def checkpoint() -> None:
        model_state, optim_state = full_train_state(raw_model, optimizer)  # every rank: FSDP gathers
        if master:
            save_checkpoint(ckpt_path, {
                "model": model_state, "optimizer": optim_state, "step": step,
                "tokens": tokens, "elapsed": elapsed0 + time.time() - t_start, "train_time": train_time,
                "loss": last_loss, "val_loss": last_val, "config": requested, "plan": plan, "rng": _rng_state(),
                "world_size": world, "best": best, "stopped_early": stopped_early,
            })

    def track_best(row: dict) -> bool:
        """Keep best.pt at the best cfg.best_metric; True when patience has run out."""
        value = row.get(cfg.best_metric)
        if value is None:
            return False
        better = best["value"] is None or (value < best["value"] if cfg.best_mode == "min" else value > best["value"])
        if better:
            best.update(value=value, step=step, bad_evals=0)
            model_state = full_model_state(raw_model)  # every rank: FSDP gathers
            if master:
                save_checkpoint(best_path, {"model": model_state, "step": step, "value": value})
        else:
            best["bad_evals"] += 1
        return cfg.patience > 0 and best["bad_evals"] >= cfg.patience

    def time_budget() -> dict:
        """Time BUDGET_PROBE_STEPS real steps at learning rate 0 (the weights do not move; the AdamW state
        and RNG are put back afterwards) and one evaluation, then fit max_steps into cfg.max_minutes."""
        t_probe = time.time()
        rng = _rng_state()
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        times = []
        for i in range(BUDGET_PROBE_STEPS):
            t0 = time.perf_counter()
            loss_sum, _ = forward_backward(i)
            optimizer_step()
            loss_sum.item()  # wait for the device
            times.append(time.perf_counter() - t0)
        optimizer.state.clear()  # a fresh AdamW, as if the probe had not run
        _set_rng_state(rng)
        eval_s = 0.0
        if eval_batches is not None:
            t0 = time.perf_counter()
            val = evaluate()
            if on_eval is not None and val is not None:
                on_eval(0, val)
            eval_s = time.perf_counter() - t0
        # A step's own cost: the lower quartile, since another job taking the cores for a moment would
        # otherwise plan far too few steps.
        timed = torch.tensor([statistics.quantiles(times[2:], n=4)[0], eval_s], dtype=torch.float64, device=device)
        if world > 1:  # every rank must plan the same number of steps
            dist.all_reduce(timed, op=dist.ReduceOp.MAX)
        step_s, eval_s = timed.tolist()
        left = cfg.max_minutes * 60 - (time.time() - t_probe) - eval_s  # the final evaluation always runs
        per_step = step_s * STEP_OVERHEAD + (eval_s / cfg.eval_every if cfg.eval_every else 0.0)
        steps = max(1, min(cfg.max_steps, int(left / per_step)))
        console.print(f"time budget {cfg.max_minutes:g} min: {step_s:.3f} s a step, {eval_s:.2f} s an evaluation "
                      f"-> {steps} steps")
        return {"max_steps": steps, "step_s": round(step_s, 4), "eval_s": round(eval_s, 3),
                "probe_s": round(time.time() - t_probe, 2), "max_minutes": cfg.max_minutes, "planned_steps": steps, "replans": []}

    def budget_used() -> float:
        return plan["probe_s"] + elapsed0 + time.time() - t_start

    def replan() -> int | None:
        """The new max_steps when the run is at a re-plan point or out of time (None: keep the plan).
        Steps per second come from this process's real steps, so what the probe missed is counted."""
        budget, done = plan["max_minutes"] * 60, step - start_step
        if done <= 0:
            return None
        if budget_used() + plan["eval_s"] >= budget:  # out of time: this step is the last
            plan["cut_at"] = step
            return step
        k = len(plan.setdefault("replans", []))
        if k >= len(BUDGET_REPLAN_AT) or budget_used() < BUDGET_REPLAN_AT[k] * budget or done < 3:
            return None
        per_step = (time.time() - t_start) / done
        steps = step + int((budget - budget_used() - plan["eval_s"]) / per_step)
        steps = max(step + 1, min(requested["max_steps"], steps))
        plan["replans"].append({"step": step, "s_per_step": round(per_step, 4), "max_steps": steps})
        console.print(f"time budget: {per_step:.3f} s a step so far -> {steps} steps (was {cfg.max_steps})")
        return steps

    if cfg.max_minutes is not None and plan is None:
        plan = time_budget()
    if plan is not None or cfg.warmup_fraction is not None:
        plan = plan or {"max_steps": cfg.max_steps}
        if cfg.warmup_fraction is not None and "warmup_steps" not in plan:  # re-plans keep the first warmup
            plan["warmup_steps"] = max(1, int(plan["max_steps"] * cfg.warmup_fraction + 1e-9))
        cfg = replace(cfg, max_steps=plan["max_steps"], warmup_steps=plan.get("warmup_steps", cfg.warmup_steps))

    n_params = sum(p.numel() for p in raw_model.parameters())
    console.print(f"training {n_params / 1e6:.2f}M params on {device}{f' x{world}' if world > 1 else ''}, "
                  f"{cfg.precision}, {cfg.batch_size * cfg.seq_len * accum * world:,} tokens/step, "
                  f"steps {step}/{cfg.max_steps}")
    history: list[dict] = []
    t_start, start_step = time.time(), step
    win_tokens, win_time = 0, 0.0
    model.train()
    with StopRequest() as stop, _progress(console, cfg, step) as (bar, task), \
            open(metrics_path, "a", encoding="utf-8") if master else _null() as mf:
        while step < cfg.max_steps and not stopped_early:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum, step_tokens = forward_backward(step)
            grad_norm = optimizer_step()
            step += 1
            tokens += step_tokens * world
            replanned = False
            if plan is not None and plan.get("max_minutes") and step < cfg.max_steps:
                new_steps = replan() if master else None
                if world > 1:  # rank 0's clock decides, so every rank stops at the same step
                    shared = torch.tensor([new_steps or 0], dtype=torch.float64, device=device)
                    dist.broadcast(shared, src=0)
                    new_steps = int(shared.item()) or None
                if new_steps and new_steps != cfg.max_steps:
                    plan["max_steps"] = new_steps
                    cfg = replace(cfg, max_steps=plan["max_steps"])
                    bar.update(task, total=cfg.max_steps)
                    replanned = True

            do_eval = eval_batches is not None and (
                step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0))
            do_log = step % cfg.log_every == 0 or step == cfg.max_steps or do_eval
            row = None
            if do_log:
                loss_avg = loss_sum / accum
                if world > 1:  # SUM then divide: gloo (CPU) has no AVG
                    dist.all_reduce(loss_avg)
                    loss_avg /= world
                last_loss = loss_avg.item()  # syncs the device, so the step time below is real
                row = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm.item()}
            dt = time.perf_counter() - t0
            train_time += dt
            win_tokens += step_tokens * world
            win_time += dt
            if do_eval:
                val = evaluate()
                if val is not None:
                    last_val = val
                    row["val_loss"] = val
                    console.print(f"step {step}: val loss {val:.4f} (ppl {math.exp(min(val, 50)):.2f})")
                    if on_eval is not None:
                        extra = on_eval(step, val) or {}
                        row.update(extra)
                        if extra:
                            console.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in extra.items()))
                    if cfg.best_metric:
                        stopped_early = track_best(row)
                        if stopped_early:
                            console.print(f"early stop at step {step}: {cfg.best_metric} has not improved for "
                                          f"{cfg.patience} evaluations (best {best['value']:.4f} at step "
                                          f"{best['step']})")
            if row is not None:
                row.update(tokens=tokens, tokens_per_s=round(win_tokens / max(win_time, 1e-9), 1),
                           elapsed=round(elapsed0 + time.time() - t_start, 3))
                win_tokens, win_time = 0, 0.0
                history.append(row)
                if master:
                    mf.write(json.dumps(row) + "\n")
                    mf.flush()
                    bar.update(task, loss=f"{row['loss']:.4f}", tps=f"{row['tokens_per_s']:,.0f}")
                    if not console.is_terminal:
                        console.print(f"step {step}/{cfg.max_steps} loss {row['loss']:.4f} lr {lr:.2e} "
                                      f"{row['tokens_per_s']:,.0f} tok/s")
            bar.update(task, completed=step)

            stopping = bool(stop.requested)  # SIGINT/SIGTERM: finish this step, checkpoint, stop
            if world > 1:  # every rank must agree to stop at the same step, or DDP deadlocks
                flag = torch.tensor([float(stopping)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopping = bool(flag.item())
            if step == cfg.max_steps or (cfg.ckpt_every and step % cfg.ckpt_every == 0) or stopping \
                    or stopped_early or replanned:
                checkpoint()
            if stopping and step < cfg.max_steps and not stopped_early:
                raise TrainingInterrupted(f"interrupted at step {step}/{cfg.max_steps}: checkpoint saved to "
                                          f"{ckpt_path}; run the same command again to resume")
    if resumed_from is not None and resumed_from == step:
        console.print(f"already trained to step {step}{' (stopped early)' if stopped_early else ''}; nothing to do")
    if cfg.best_metric and best["step"] is not None and _broadcast_object(master and best_path.is_file(), world):
        load_model_state(raw_model, load_checkpoint(best_path)["model"] if master else {}, world)  # end on the best
        console.print(f"restored the best weights: {cfg.best_metric} {best['value']:.4f} at step {best['step']}")
    full_state = full_model_state(raw_model) if fsdp else None
    return TrainResult(step=step, tokens=tokens, loss=last_loss, val_loss=last_val,
                       tokens_per_s=tokens / train_time if train_time > 0 else 0.0, train_time_s=train_time,
                       elapsed_s=elapsed0 + time.time() - t_start, resumed_from=resumed_from, out_dir=out,
                       history=history, best_step=best["step"], best_value=best["value"],
                       stopped_early=stopped_early, plan=plan, full_state=full_state if master else None)


def _check_resume(ck: dict, requested: dict, world: int, path: Path, console) -> None:
    """Refuse to resume into a different run: a changed world size or a setting that changes what is
    trained (batch, seq_len, lr, schedule, seed, steps, ...) would silently mix two runs in one model."""
    old = ck.get("config", {})
    changed = {k: (old[k], v) for k, v in requested.items() if k in old and old[k] != v}
    old_world = ck.get("world_size", 1)
    if old_world != world:
        changed["world_size"] = (old_world, world)
    if not changed:
        return
    # Another world size trains on the same micro-batches when the global batch is unchanged (see train()).
    same_global = (old.get("batch_size") == requested["batch_size"]
                   and old.get("grad_accum", 1) * old_world == requested["grad_accum"] * world)
    free = RESUME_FREE + (("world_size", "grad_accum", "global_batch_size", "fsdp") if same_global else ("fsdp",))
    listed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
    if "world_size" in changed and not same_global:
        listed += (f"; the global batch changed from {old.get('batch_size')} x {old.get('grad_accum', 1)} x "
                   f"{old_world} to {requested['batch_size']} x {requested['grad_accum']} x {world}: set "
                   f"global_batch_size to keep it")
    if requested.get("force_resume") or all(k in free for k in changed):
        console.print(f"[yellow]resuming with changed settings: {listed}")
        return
    raise SlmforgeError(f"{path}: this checkpoint was trained with other settings ({listed}); resuming would mix "
                        f"two runs. Use the checkpoint's settings, another output folder, --no-resume to start "
                        f"over, or force_resume (--force-resume) to continue anyway")


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


class _progress:
    """A rich progress bar (step, loss, tokens/s, ETA) on the master rank of an interactive terminal."""

    def __init__(self, console, cfg: TrainConfig, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                            TextColumn("ETA"), TimeRemainingColumn(), console=console,
                            disable=console.quiet or not console.is_terminal)
        self.task = self.bar.add_task("train", total=cfg.max_steps, completed=start, loss="-", tps="-")

    def __enter__(self):
        self.bar.__enter__()
        return self.bar, self.task

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)


# ---------------------------------------------------------------------------------------------------------
# Plot


def plot_loss_curve(metrics_jsonl: str | Path, out_png: str | Path, title: str | None = None) -> Path | None:
    """Train and val loss against step (tokens on the top axis). Returns None when there is nothing to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_jsonl)
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    fig = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch, safe in any process
    ax = fig.add_subplot()
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], lw=1, label="train loss")
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", ms=3, lw=1.5, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    last = rows[-1]
    if last.get("tokens") and last["step"]:
        per_step = last["tokens"] / last["step"]
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel("tokens")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
