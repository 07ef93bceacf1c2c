"""Bits per byte of model directories on real TinyStories text (slmforge.evaluate.perplexity).

    python benchmarks/bits_per_byte.py runs/quickstart/pretrain/model runs/stories260K

Each paragraph of the text (blank-line separated) is scored on its own from BOS; bits/byte = total NLL
over ln 2 x UTF-8 bytes, so models with different tokenizers compare. With no model dirs, imports
stories260K into runs/stories260K first and scores it. Writes benchmarks/results/bits_per_byte.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from slmforge.evaluate.perplexity import format_table, judge

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tinystories"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path, help="model directories")
    ap.add_argument("--text", type=Path, action="append", help="text files (default: tinystories_valid_part1)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bits_per_byte.json")
    args = ap.parse_args()
    texts = args.text or [DATA / "tinystories_valid_part1.txt"]
    models = args.models
    if not models:
        from slmforge.convert.llama2c import import_llama2c

        models = [import_llama2c(DATA / "stories260K.bin", DATA / "tok512.bin", REPO / "runs" / "stories260K")]
    load = os.getloadavg()[0]
    reports = []
    for m in models:
        t = time.perf_counter()
        reports.append({**judge(m, texts), "seconds": round(time.perf_counter() - t, 1)})
    print(format_table(reports))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                    "machine": platform.processor() or platform.machine(),
                                    "load_avg_1m_before": load, "reports": reports}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
