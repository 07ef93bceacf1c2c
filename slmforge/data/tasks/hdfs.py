"""HDFS logs (loghub): DeepLog sessions for anomaly detection, and a template parser for raw log lines."""

from __future__ import annotations

import csv
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from slmforge.data.tasks.splits import (
    read_lines,
    source_path,
    write_splits,
)
from slmforge.errors import SlmforgeError


def _session_row(id_: str, events: list[int], label: str | None = None) -> dict:
    """A session as text for a next-event LM ("E5 E5 E22 ..."; ids as in loghub's HDFS_templates.csv)."""
    row = {"id": id_, "text": " ".join(f"E{e}" for e in events), "events": events}
    return row if label is None else {**row, "label": label}


def _read_sessions(path: Path) -> list[list[int]]:
    sessions = []
    for lineno, line in enumerate(read_lines(path), 1):
        try:
            sessions.append([int(t) for t in line.split()])
        except ValueError:
            raise SlmforgeError(f"{path}:{lineno}: expected space-separated event ids") from None
    return sessions


def prepare_hdfs(data_dir: str | Path, out_dir: str | Path, seed: int = 0, n_test_normal: int = 1000,
                 abnormal_per_normal: float = 1.0, n_val: int = 500) -> dict:
    """DeepLog's HDFS block sessions. hdfs_train (4,855 normal sessions) → a seeded hold-out of
    n_test_normal sessions for test and n_val for val, the rest to train the next-event LM on normal
    behaviour only.

    Normal HDFS sessions repeat a few shapes (4,855 sessions, 839 distinct), so most held-out sessions
    occur verbatim in train: a model that memorised train calls them normal without having learned
    anything. test.jsonl and val.jsonl therefore hold each distinct held-out normal session once, and only
    those found in no training session; the ones seen in train are written once each to test_seen.jsonl
    and counted apart in stats.json. Each gets round(abnormal_per_normal * its normal count) distinct
    sessions of hdfs_test_abnormal (16,838 sessions, 4,123 distinct), labelled "anomalous", val and test
    disjoint. Rows: {"id", "text", "events", "label"}.

    DeepLog flags a test session as anomalous when any of its events is not among the model's top-g
    predictions given the events before it; evaluate with binary_metrics(positive="anomalous")."""
    normal_path = source_path(data_dir, "loghub/deeplog_hdfs_sessions/hdfs_train")
    abnormal_path = source_path(data_dir, "loghub/deeplog_hdfs_sessions/hdfs_test_abnormal")
    normal, abnormal = _read_sessions(normal_path), _read_sessions(abnormal_path)
    if not 0 < n_test_normal + n_val < len(normal):
        raise SlmforgeError(f"n_test_normal + n_val = {n_test_normal + n_val}: must be below {len(normal)}")
    rng = random.Random(seed)
    order = list(range(len(normal)))
    rng.shuffle(order)
    test_pool, val_pool = sorted(order[:n_test_normal]), sorted(order[n_test_normal:n_test_normal + n_val])
    held = set(test_pool) | set(val_pool)
    train = [i for i in range(len(normal)) if i not in held]
    seen = {tuple(normal[i]) for i in train}

    def distinct(pool: list[int], exclude: set) -> tuple[list[int], list[int]]:
        """First occurrence of each distinct session in pool: (unseen in train, seen in train)."""
        firsts, got = [], set(exclude)
        for i in pool:
            if tuple(normal[i]) not in got:
                got.add(tuple(normal[i]))
                firsts.append(i)
        return [i for i in firsts if tuple(normal[i]) not in seen], [i for i in firsts if tuple(normal[i]) in seen]

    test_normal, test_seen = distinct(test_pool, set())
    val_normal, _ = distinct(val_pool, {tuple(normal[i]) for i in test_pool})
    firsts: dict[tuple, int] = {}
    for i, s in enumerate(abnormal):
        if tuple(s) not in seen:
            firsts.setdefault(tuple(s), i)
    abnormal_idx = sorted(firsts.values())
    n_abn_test, n_abn_val = round(abnormal_per_normal * len(test_normal)), round(abnormal_per_normal * len(val_normal))
    if n_abn_test + n_abn_val > len(abnormal_idx):
        raise SlmforgeError(f"{n_abn_test + n_abn_val} distinct abnormal sessions asked, {abnormal_path} has "
                            f"{len(abnormal_idx)}")
    picked = rng.sample(abnormal_idx, n_abn_test + n_abn_val)
    test_abnormal, val_abnormal = sorted(picked[:n_abn_test]), sorted(picked[n_abn_test:])
    splits = {
        "train": [_session_row(f"hdfs-normal-{i}", normal[i]) for i in train],
        "val": [_session_row(f"hdfs-normal-{i}", normal[i], "normal") for i in val_normal]
        + [_session_row(f"hdfs-abnormal-{i}", abnormal[i], "anomalous") for i in val_abnormal],
        "test": [_session_row(f"hdfs-normal-{i}", normal[i], "normal") for i in test_normal]
        + [_session_row(f"hdfs-abnormal-{i}", abnormal[i], "anomalous") for i in test_abnormal],
        "test_seen": [_session_row(f"hdfs-normal-{i}", normal[i], "normal") for i in test_seen],
    }
    splits["test_deeplog"] = _deeplog_protocol_rows(normal, abnormal, test_pool, train,
                                                    {tuple(abnormal[i]) for i in val_abnormal})
    if not n_val:
        del splits["val"]
    events = Counter(e for s in normal for e in s)
    inputs = {name: [r["text"] for r in rows] for name, rows in splits.items()}
    return write_splits(out_dir, splits, {
        "task": "hdfs", "kind": "anomaly", "seed": seed, "normal_sessions": len(normal),
        "abnormal_sessions": len(abnormal), "distinct_normal": len(set(map(tuple, normal))),
        "distinct_abnormal": len(abnormal_idx),
        "held_normal": {"test": len(test_pool), "val": len(val_pool)},
        "test_normal_distinct": {"unseen_in_train": len(test_normal), "seen_in_train": len(test_seen),
                                 "duplicates_dropped": len(test_pool) - len(test_normal) - len(test_seen)},
        "test_labels": {"normal": len(test_normal), "anomalous": n_abn_test},
        "val_labels": {"normal": len(val_normal), "anomalous": n_abn_val},
        "train_event_vocab": sorted(events), "empty_sessions": sum(1 for s in normal + abnormal if not s),
        "sources": [str(normal_path), str(abnormal_path)]}, inputs)


def _deeplog_protocol_rows(normal: list[list[int]], abnormal: list[list[int]], test_pool: list[int],
                           train: list[int], val_abnormal: set[tuple]) -> list[dict]:
    """DeepLog's own test protocol, for comparison with its published figures: every held-out normal
    session and every abnormal one, repeats and sessions seen in train included (abnormal ones whose shape
    is in val left out, since val chose g). Each distinct session once, with its "count"; the figures
    weigh each by its count. Flags: "seen_in_train" (equal to a training session) and "prefix_of_train"
    (a proper prefix of one: a session cut short, detectable only by where it ends)."""
    seen = {tuple(normal[i]) for i in train}
    prefixes = {tuple(normal[i][:k]) for i in train for k in range(1, len(normal[i]))}
    rows = []
    for label, counts in (("normal", Counter(tuple(normal[i]) for i in test_pool)),
                          ("anomalous", Counter(tuple(s) for s in abnormal if tuple(s) not in val_abnormal))):
        for j, (shape, n) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))):
            rows.append({**_session_row(f"hdfs-deeplog-{label}-{j}", list(shape), label), "count": n,
                         "seen_in_train": shape in seen, "prefix_of_train": shape in prefixes})
    return rows


# "081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_38 terminating"
_HDFS_LINE = re.compile(r"^(?P<date>\d{6}) (?P<time>\d{6}) (?P<pid>\d+) (?P<level>[A-Z]+) "
                        r"(?P<component>[^:]+): (?P<content>.*)$")
# Variable parts, masked in this order (Drain's HDFS preprocessing, plus loghub's template conventions).
_MASKS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"blk_-?\d+"), "blk_<*>"),                            # block ids
    (re.compile(r"(?:blk_<\*>\s*){2,}"), "blk_<*>"),                   # a list of blocks is one field
    (re.compile(r"\d{1,3}(?:\.\d{1,3}){3}"), "<*>"),                  # IPv4 (the port is a number below)
    (re.compile(r"/[^\s/]+(?:/[^\s/]+)*/(?=[^\s/]+)"), "/<*>/"),       # directories of a path, file kept
    (re.compile(r"(?<![\w<*>])-?\d+(?![\w])"), "<*>"),                # standalone numbers
    (re.compile(r"(?<=[-_])\d+(?![\w])"), "<*>"),                     # numbered names: part-00296
]


def hdfs_template(content: str) -> str:
    """The event template of an HDFS log message: variables (blocks, addresses, paths, numbers) as <*>."""
    for pattern, repl in _MASKS:
        content = pattern.sub(repl, content)
    return content


def parse_hdfs_lines(path: str | Path, templates: dict[str, str] | None = None) -> list[dict]:
    """Parse raw HDFS log lines into header fields, content and event template.

    templates ({template: event_id}, e.g. read from a loghub *_templates.csv) names the events it
    knows; other templates get ids "T1", "T2", ... by first appearance. A line that is not an HDFS
    log line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise SlmforgeError(f"{path}: no such file")
    known = dict(templates or {})
    new_ids: dict[str, str] = {}
    parsed = []
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        m = _HDFS_LINE.match(line)
        if not m:
            raise SlmforgeError(f"{path}:{lineno}: not an HDFS log line (date time pid level component: ...)")
        template = hdfs_template(m["content"])
        if template not in known:
            known[template] = new_ids.setdefault(template, f"T{len(new_ids) + 1}")
        parsed.append({"line": lineno, **m.groupdict(), "template": template, "event_id": known[template]})
    return parsed


def read_loghub_csv(path: str | Path, columns: Sequence[str]) -> list[dict]:
    """Rows of a loghub *_structured.csv or *_templates.csv, checking the columns named are there."""
    path = Path(path)
    if not path.is_file():
        raise SlmforgeError(f"{path}: no such file")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        lacking = [c for c in columns if c not in (reader.fieldnames or [])]
        if lacking:
            raise SlmforgeError(f"{path}:1: missing columns {', '.join(lacking)}")
        return list(reader)


def _wildcard_regex(template: str) -> re.Pattern:
    """A loghub template ("<*>Receiving block<*>src:<*>dest:<*>") as a regex, <*> matching anything."""
    return re.compile(".*?".join(map(re.escape, template.split("<*>"))))


def hdfs_sessions_from_log(log_path: str | Path, templates_csv: str | Path) -> dict[str, list[int]]:
    """Raw HDFS lines → DeepLog sessions: {block id: [event id, ...]} in log order, event ids from
    loghub's whole-HDFS HDFS_templates.csv (the numbering of hdfs_train), so a model trained by
    prepare_hdfs can score raw logs. A line naming several blocks adds its event to each; a line that
    matches no template is an error naming it."""
    table = read_loghub_csv(templates_csv, ["EventId", "EventTemplate"])
    patterns = [(int(r["EventId"].lstrip("E")), _wildcard_regex(r["EventTemplate"])) for r in table]
    sessions: dict[str, list[int]] = {}
    for p in parse_hdfs_lines(log_path):
        event = next((e for e, rx in patterns if rx.fullmatch(p["content"])), None)
        if event is None:
            raise SlmforgeError(f"{log_path}:{p['line']}: matches no template in {templates_csv}")
        for block in dict.fromkeys(re.findall(r"blk_-?\d+", p["content"])):
            sessions.setdefault(block, []).append(event)
    return sessions


def hdfs_parse_agreement(data_dir: str | Path) -> dict:
    """parse_hdfs_lines on loghub's HDFS_2k.log against its structured CSV (EventId, EventTemplate):
    template agreement, event-id agreement (ids from HDFS_2k.log_templates.csv) and grouping accuracy."""
    from slmforge.evaluate.tasks import log_parsing_metrics

    folder = source_path(data_dir, "loghub/HDFS")
    table = read_loghub_csv(folder / "HDFS_2k.log_templates.csv", ["EventId", "EventTemplate"])
    gold = read_loghub_csv(folder / "HDFS_2k.log_structured.csv",
                           ["LineId", "Content", "EventId", "EventTemplate"])
    parsed = parse_hdfs_lines(folder / "HDFS_2k.log", {r["EventTemplate"]: r["EventId"] for r in table})
    if len(parsed) != len(gold):
        raise SlmforgeError(f"{folder}/HDFS_2k.log: {len(parsed)} lines, the structured CSV has {len(gold)}")
    for p, g in zip(parsed, gold, strict=True):
        if p["content"] != g["Content"]:
            raise SlmforgeError(f"{folder}/HDFS_2k.log:{p['line']}: content differs from the structured "
                                f"CSV's LineId {g['LineId']}")
    result = log_parsing_metrics([p["template"] for p in parsed], [g["EventTemplate"] for g in gold])
    same_id = sum(1 for p, g in zip(parsed, gold, strict=True) if p["event_id"] == g["EventId"])
    wrong = Counter((g["EventTemplate"], p["template"]) for p, g in zip(parsed, gold, strict=True)
                    if p["template"] != g["EventTemplate"])
    return {**result, "event_id_agreement": 100.0 * same_id / len(gold),
            "disagreements": [{"gold": g, "parsed": t, "lines": n} for (g, t), n in wrong.most_common(10)]}
