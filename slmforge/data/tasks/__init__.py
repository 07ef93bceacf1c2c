"""Task data sets as slmforge task JSONL: one module per data set, one `prepare_<name>(data_dir, out_dir,
seed, **options)` in each, registered in LOADERS (the names a recipe's `data: {loader: ...}` takes).

data_dir is the folder holding the sources as laid out in shared/data/SOURCES.md (sst2/train.tsv,
multi30k/, medical/, loghub/, keyphrase/Inspec.zip, summarization/); support_chat and stories generate
their data.
Each loader writes

    out_dir/train.jsonl, [val.jsonl], test.jsonl    one example a line, each with a stable "id"
    out_dir/stats.json                               counts, sources, seed, options (returned too)

in one of three row formats (`fmt`):

    classification   {"id", "text", "label"}
    prompt           {"id", "prompt", "completion", ...}       completion starts with a space (TRL style)
    chat             {"id", "messages": [{"role": "user", ...}, {"role": "assistant", ...}], ...}

Prompt and chat rows keep the fields the metrics need next to them ("label", "keyphrases"), so a
test file is also the reference file of `evaluate_predictions`. Splits are seeded and deterministic
(same sources + seed = byte-identical files), stratified by label where there is one, and made at the
level that avoids leakage (a whole abstract, a whole session). The folder is written aside and swapped
into place, so a failed run leaves the previous output untouched.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

from slmforge.data.tasks.dialogsum import DIALOGSUM_TEMPLATE, prepare_dialogsum, read_samsum
from slmforge.data.tasks.hdfs import (
    hdfs_parse_agreement,
    hdfs_sessions_from_log,
    hdfs_template,
    parse_hdfs_lines,
    prepare_hdfs,
    read_loghub_csv,
)
from slmforge.data.tasks.inspec import INSPEC_TEMPLATE, prepare_inspec, read_inspec
from slmforge.data.tasks.pubmedqa import PUBMEDQA_LABELS, PUBMEDQA_TEMPLATE, prepare_pubmedqa
from slmforge.data.tasks.splits import (
    FORMATS,
    describe_overlap,
    drop_held,
    holdout,
    normalize,
    overlap_of,
    overlap_report,
    write_splits,
)
from slmforge.data.tasks.sst2 import prepare_sst2
from slmforge.data.tasks.stories import prepare_stories
from slmforge.data.tasks.support_chat import prepare_support_chat, prepare_support_chat_safety
from slmforge.data.tasks.text import prepare_text
from slmforge.data.tasks.translation import (
    prepare_multi30k,
    prepare_translation_domain,
    prepare_wmt_biomed,
    read_medline_docs,
    translation_prompt,
)
from slmforge.errors import SlmforgeError

__all__ = ["DIALOGSUM_TEMPLATE", "FORMATS", "INSPEC_TEMPLATE", "LOADERS", "PUBMEDQA_LABELS", "PUBMEDQA_TEMPLATE",
           "describe_overlap", "drop_held", "hdfs_parse_agreement", "hdfs_sessions_from_log", "hdfs_template",
           "holdout", "normalize", "overlap_of", "overlap_report", "parse_hdfs_lines", "prepare", "prepare_dialogsum",
           "prepare_hdfs", "prepare_inspec", "prepare_multi30k", "prepare_pubmedqa", "prepare_sst2", "prepare_stories",
           "prepare_support_chat", "prepare_support_chat_safety", "prepare_text", "prepare_translation_domain", "prepare_wmt_biomed", "read_inspec",
           "read_loghub_csv", "read_medline_docs", "read_samsum", "resolve_data_dir", "translation_prompt",
           "write_splits"]

LOADERS: dict[str, Callable[..., dict]] = {
    "sst2": prepare_sst2, "multi30k": prepare_multi30k, "wmt_biomed": prepare_wmt_biomed,
    "translation_domain": prepare_translation_domain, "pubmedqa": prepare_pubmedqa, "hdfs": prepare_hdfs,
    "inspec": prepare_inspec, "dialogsum": prepare_dialogsum, "support_chat": prepare_support_chat,
    "support_chat_safety": prepare_support_chat_safety,
    "stories": prepare_stories, "text": prepare_text,
}
GENERATED = ("support_chat", "stories")  # loaders that make their data: they read no data folder


DATA_ENV = "SLMFORGE_DATA"  # the folder of the source data sets, when --data is not given
DEFAULT_DATA = Path("..") / "shared" / "data"  # else: beside the directory slmforge runs in


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The folder holding the source data sets (laid out as shared/data/SOURCES.md): --data, else
    $SLMFORGE_DATA, else ../shared/data from the working directory."""
    p = Path(data_dir or os.environ.get(DATA_ENV) or DEFAULT_DATA)
    if not p.is_dir():
        raise SlmforgeError(f"{p}: data folder not found (the folder of shared/data/SOURCES.md); pass --data DIR "
                            f"or set {DATA_ENV}")
    return p


def prepare(name: str, data_dir: str | Path | None, out_dir: str | Path, seed: int = 0, **options) -> dict:
    """Run the loader called `name` (a recipe's `data: {task: inspec, ...}`)."""
    if name not in LOADERS:
        raise SlmforgeError(f"unknown task data {name!r}: one of {', '.join(LOADERS)}")
    takes = inspect.signature(LOADERS[name]).parameters
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise SlmforgeError(f"task data {name}: unknown option(s) {', '.join(unknown)} "
                            f"(it takes {', '.join(k for k in takes if k not in ('data_dir', 'out_dir'))})")
    for key, value in options.items():  # the default's type is the option's type (YAML gives true, 500, 0.5)
        default = takes[key].default
        want = type(default) if default not in (inspect.Parameter.empty, None) else None
        ok = (want is None or (isinstance(value, want) and not (want is int and isinstance(value, bool)))
              or (want is float and isinstance(value, int) and not isinstance(value, bool)))
        if not ok:
            raise SlmforgeError(f"task data {name}: option {key} must be {want.__name__}, got {value!r}")
    return LOADERS[name](data_dir, out_dir, seed=seed, **options)
