"""Stories for pretraining: the TinyStories seeding formula, written by the offline template generator
(teacher "builtin", slmforge/data/storygen.py) or sampled from a base LM directory (a teacher, as
TinyStories' authors used GPT-3.5/4), as {"id", "text"} rows: the last n_val stories are val.

The stories are synthesized into a file beside out_dir first (slmforge.data.synth: resumable, so an
interrupted run continues where it stopped), then split and swapped into place.
"""

from __future__ import annotations

import json
from pathlib import Path

from slmforge.data.tasks.splits import write_splits
from slmforge.errors import SlmforgeError


def prepare_stories(data_dir: str | Path | None, out_dir: str | Path, seed: int = 0, n: int = 20_000,
                    teacher: str = "builtin", n_val: int = 0) -> dict:
    """n stories (n_val of them, default 2%, held out as val). data_dir is not read (the data is generated)."""
    from slmforge.data.synth import synthesize

    n_val = n_val or max(1, n // 50)
    if not 0 < n_val < n:
        raise SlmforgeError(f"stories: n_val {n_val} must be between 1 and n - 1 = {n - 1}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_name(f".{out.name}.stories.jsonl")
    stats = synthesize("stories", n, raw, teacher=teacher, seed=seed, batch_size=512)
    rows = [json.loads(line) for line in raw.open(encoding="utf-8")]
    if len(rows) < n:  # a teacher request failed after its retries: a re-run retries it
        raise SlmforgeError(f"stories: {n - len(rows)} of {n} stories could not be written; run again to retry")
    rows = [{"id": f"story-{i}", "text": r["text"]} for i, r in enumerate(rows[:n])]
    splits = {"train": rows[:n - n_val], "val": rows[n - n_val:]}
    result = write_splits(out, splits, {"task": "stories", "kind": "text", "seed": seed, "teacher": teacher,
                                        "stories": n, "synth_seconds": round(stats.elapsed_s, 1)},
                          {k: [r["text"] for r in v] for k, v in splits.items()})
    raw.unlink(missing_ok=True)
    Path(f"{raw}.stats.json").unlink(missing_ok=True)
    return result
