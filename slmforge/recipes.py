"""Task recipes: `slmforge run sst2` (or `slmforge run path/to/recipe.yaml`).

A recipe (YAML, see slmforge/recipes/*.yaml) chains the stages that turn real task data into a model and
a report comparing ways of getting there:

    data        slmforge.data.tasks.prepare(loader) -> out/data/{train,val,test}.jsonl
    tokenizer   a byte-level BPE trained on the task's own training text (in-domain, small vocabulary)
    pretrain    a small Llama pretrained on that same text (no external weights)
    scratch     the same architecture, randomly initialised (the from-scratch baseline)
    variants    fine-tune runs: from scratch / from the pretrained model / LoRA / from another variant
    predict     each variant on the val file (which chooses top_g and the shipped variant), then on the test file (slmforge predict; a variant may override the recipe's
                predict section, e.g. a keyphrase tagger that extracts where the others generate)
    eval        evaluate_predictions -> metrics.json per variant
    report      out/report.md + out/report.json (params, trainable params, train time, quality), and
                out/model: a copy of the variant best on validation

Every stage writes its output atomically and is skipped when that output exists, and training resumes
from its checkpoint, so an interrupted run picks up where it stopped. Training budgets are minutes
(`max_minutes` of the stage's config): train() times its own first steps, plans the step count, plans again
from the real steps' wall time and stops at the budget; the plan is in its checkpoint, so a resumed run keeps
the same schedule. `minutes_scale` shrinks (or grows) every budget at
once. The recipe's `seed` is every stage's seed.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pydantic import with_config
from rich.console import Console

from slmforge.data.tasks import describe_overlap, overlap_of, resolve_data_dir
from slmforge.errors import SlmforgeError
from slmforge.io import atomic_write_text, read_json, read_jsonl, write_dir_atomically, write_json
from slmforge.stage_config import STRICT, build, line_of, read_yaml, set_fields
from slmforge.train.finetune import FinetuneConfig
from slmforge.train.pretrain import PretrainConfig

console = Console(stderr=True)
RECIPE_DIR = Path(__file__).parent / "recipes"
INITS = ("scratch", "pretrained")  # or "variant:<name>"
EXTRAS = ("hdfs_parse", "deeplog_protocol", "redteam")


# ---------------------------------------------------------------------------------------------------------
# The recipe file: plain dataclasses, read from YAML and validated by stage_config.build (file:line errors).
# A variant's `finetune:` and the recipe's `pretrain:` are the stages' own configs (FinetuneConfig,
# PretrainConfig): one place for every default, shared with the CLI.


@with_config(STRICT)
@dataclass
class ExtraText:
    """Another loader's rows whose text joins the pretraining corpus (not the tokenizer's training text), for a
    task whose own text is small. A document sharing a 13-word n-gram with a val or test input of the task is
    dropped."""

    loader: str  # a slmforge.data.tasks loader
    options: dict = field(default_factory=dict)  # passed to the loader
    files: list[str] = field(default_factory=list)  # the loader's files to read; empty: every split it wrote


@with_config(STRICT)
@dataclass
class DataSpec:
    loader: str  # a slmforge.data.tasks loader: sst2, multi30k, ..., support_chat
    options: dict = field(default_factory=dict)  # passed to the loader
    test: str | None = "test.jsonl"  # the evaluation file, relative to the prepared data folder: scored once per variant
    val: str = "val.jsonl"  # the file the variant (and every tuned number) is chosen on
    pretrain_text: list[str] = field(default_factory=lambda: ["train.jsonl"])  # files whose text is the corpus
    pretrain_extra: list[ExtraText] = field(default_factory=list)  # other task data, pretraining text only


@with_config(STRICT)
@dataclass
class ModelSpec:
    preset: str = "3m"
    vocab_size: int = 2048
    context: int = 256  # max_position_embeddings
    overrides: dict = field(default_factory=dict)  # any ModelConfig field: hidden_size, num_hidden_layers, ...


@with_config(STRICT)
@dataclass
class PredictSpec:
    mode: str = "generate"  # classify | generate | deeplog | extract
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    batch_size: int = 16
    top_g: int = 9
    sweep_top_g: list[int] = field(default_factory=list)  # deeplog: the top_g values tried on val; the best is used
    top_k: int = 10  # extract: keyphrases per document
    limit: int | None = None  # predict only the first N test rows
    labels: list[str] | None = None
    beams: int = 1  # generate: beam search with this many beams (1: greedy)
    length_penalty: float = 1.0  # generate with beams: log-probability / length**length_penalty
    # generate with beams: length penalties tried on val (each a decode of val); the best is used on test
    sweep_length_penalty: list[float] = field(default_factory=list)


@with_config(STRICT)
@dataclass
class VariantSpec:
    name: str
    init: str = "pretrained"  # scratch | pretrained | variant:<name>
    finetune: FinetuneConfig | None = None  # None: evaluate the init model as it is
    train: str = "train.jsonl"  # fine-tuning data, relative to the data folder
    val: str | None = None  # default: the recipe's data.val when the loader wrote it, else val_fraction of train
    predict: PredictSpec | None = None  # None: the recipe's predict section
    note: str = ""
    # earlier tagger variants whose O/B/I probabilities this variant averages (no finetune; init unused)
    ensemble: list[str] = field(default_factory=list)


@with_config(STRICT)
@dataclass
class EvalSpec:
    task: str  # an evaluate_predictions task: classification, binary, translation, ...
    metric: str  # the headline figure: variants are compared by it on val, and the best on val is shipped
    labels: list[str] | None = None
    positive: str = "anomalous"
    ks: list[int] = field(default_factory=lambda: [5, 10])
    tokenize: str | None = None


@with_config(STRICT)
@dataclass
class JudgeSpec:
    """The pretrained model judged on its own: bits per byte (slmforge.evaluate.perplexity) on the loader's
    val split and on real text files, beside reference model dirs scored on the same files, and samples."""

    files: list[str] = field(default_factory=list)  # real text (or JSONL) files, bits/byte on each
    references: list[str] = field(default_factory=list)  # model dirs judged on the same files
    max_val_docs: int = 200
    samples: int = 4
    sample_tokens: int = 200
    prompts: list[str] = field(default_factory=lambda: ["Once upon a time", "One day, a little", "Tom and his mom",
                                                         "The sun was"])


@with_config(STRICT)
@dataclass
class Recipe:
    name: str
    data: DataSpec
    variants: list[VariantSpec] = field(default_factory=list)  # none: pretraining (and judge) only
    predict: PredictSpec | None = None  # needed with variants
    eval: EvalSpec | None = None  # needed with variants
    judge: JudgeSpec | None = None
    description: str = ""
    seed: int = 0
    model: ModelSpec | None = None
    pretrain: PretrainConfig | None = None  # the stage's own config: the same fields as `slmforge pretrain`
    # hdfs_parse: parse raw HDFS lines, score their sessions; deeplog_protocol: DeepLog's own test protocol;
    # redteam: scan every variant on the loader's held-out red-team probes (before/after safety fine-tuning)
    extras: list[str] = field(default_factory=list)
    path: str = ""


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: a path, or the name of a bundled recipe (sst2, recipes/sst2.yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    bundled = RECIPE_DIR / f"{p.name.removesuffix('.yaml')}.yaml"
    if bundled.is_file():
        return bundled
    names = ", ".join(sorted(f.stem for f in RECIPE_DIR.glob("*.yaml")))
    raise SlmforgeError(f"{name_or_path}: no such recipe file (bundled recipes: {names})")


def load_recipe(name_or_path: str | Path, overrides: dict | None = None) -> Recipe:
    """Read and check a recipe; any problem is one error naming file:line and the field. overrides:
    {"pretrain.max_minutes": 5, ...}, dotted fields set before checking (`slmforge run --set`, quickstart)."""
    from slmforge.config import PRESET_NAMES
    from slmforge.data.tasks import LOADERS
    from slmforge.evaluate.tasks import TASKS as EVAL_TASKS
    from slmforge.infer.predict import MODES

    path = find_recipe(name_or_path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SlmforgeError(f"{path}:1: a recipe is a mapping (name, data, variants, predict, eval, ...)")
    if "path" in raw:
        raise SlmforgeError(f"{path}:{line_of(raw, ('path',))}: field 'path': unknown field")
    set_fields(raw, overrides or {}, path)
    recipe = build(Recipe, raw, path)
    recipe.path = str(path)

    def line(m, key: str) -> str:
        return f"{path}:{getattr(m, 'lines', {}).get(key, getattr(m, 'line', 1))}"

    def check(ok: bool, m, key: str, msg: str) -> None:
        if not ok:
            raise SlmforgeError(f"{line(m, key)}: field '{key}': {msg}")

    check(recipe.data.loader in LOADERS, raw["data"], "loader",
          f"unknown loader {recipe.data.loader!r} (one of {', '.join(LOADERS)})")
    for i, extra in enumerate(recipe.data.pretrain_extra):
        check(extra.loader in LOADERS, raw["data"]["pretrain_extra"][i], "loader",
              f"unknown loader {extra.loader!r} (one of {', '.join(LOADERS)})")

    def check_predict(p: PredictSpec, m) -> None:
        check(p.mode in MODES, m, "mode", f"one of {', '.join(MODES)}")
        check(p.top_k > 0, m, "top_k", "must be > 0")
        check(p.beams > 0, m, "beams", "must be > 0")
        check(p.beams == 1 or p.mode == "generate", m, "beams", "only for predict mode generate")
        check(not p.sweep_top_g or p.mode == "deeplog", m, "sweep_top_g", "only for predict mode deeplog")
        check(all(g > 0 for g in p.sweep_top_g), m, "sweep_top_g", "every top_g must be > 0")
        check(not p.sweep_length_penalty or p.beams > 1, m, "sweep_length_penalty", "needs beams > 1")

    if recipe.variants:
        check(recipe.predict is not None and recipe.eval is not None, raw, "variants",
              "variants need a 'predict' and an 'eval' section")
        check_predict(recipe.predict, raw["predict"])
        check(recipe.eval.task in EVAL_TASKS, raw["eval"], "task", f"one of {', '.join(EVAL_TASKS)}")
        check(recipe.data.test is not None, raw["data"], "test", "variants are scored on a test file")
    if recipe.model:
        check(recipe.model.preset.lower() in PRESET_NAMES, raw["model"], "preset",
              f"unknown preset (one of {', '.join(PRESET_NAMES)})")
    check(bool(recipe.variants) or recipe.pretrain is not None, raw, "variants",
          "needs at least one variant, or a pretrain section")
    check(recipe.judge is None or recipe.pretrain is not None, raw, "judge",
          "judges the pretrained model: needs a 'pretrain' section")
    seen: set[str] = set()
    for v, m in zip(recipe.variants, raw.get("variants") or [], strict=True):
        check(v.name not in seen, m, "name", f"duplicate variant name {v.name!r}")
        if v.ensemble:
            by_name = {x.name: x for x in recipe.variants}
            check(len(v.ensemble) >= 2 and all(n in seen for n in v.ensemble), m, "ensemble",
                  "needs 2 or more earlier variants")
            check(v.finetune is None and all(by_name[n].finetune is not None and by_name[n].finetune.task == "tag"
                                             for n in v.ensemble), m, "ensemble",
                  "averages fine-tuned taggers (finetune task tag) and trains nothing itself")
            check((v.predict or recipe.predict).mode == "extract", m, "ensemble", "needs predict mode extract")
        elif v.init.startswith("variant:"):
            check(v.init.split(":", 1)[1] in seen, m, "init", f"{v.init!r}: no earlier variant of that name")
        else:
            check(v.init in INITS, m, "init", "scratch, pretrained or variant:<name>")
            check(recipe.model is not None, m, "init", f"{v.init!r} needs a 'model' section")
            check(v.init != "pretrained" or recipe.pretrain is not None, m, "init",
                  "'pretrained' needs a 'pretrain' section")
        check(v.finetune is not None or (v.train == "train.jsonl" and v.val is None), m, "train",
              "train and val are the fine-tuning data: the variant needs a finetune section")
        if v.predict:
            check_predict(v.predict, m["predict"])
        if v.finetune:  # a tagger extracts, and only a tagger can
            extract = (v.predict or recipe.predict).mode == "extract"
            check(extract == (v.finetune.task == "tag"), m, "predict",
                  "finetune task tag needs predict mode extract (give the variant predict: {mode: extract})"
                  if not extract else "predict mode extract needs finetune task tag")
        seen.add(v.name)
    if recipe.pretrain:
        check(recipe.model is not None, raw, "pretrain", "needs a 'model' section")
    for section in [raw.get("pretrain")] + [v.get("finetune") for v in raw.get("variants") or []]:
        check(not isinstance(section, dict) or "seed" not in section, section or raw, "seed",
              "the recipe's top-level seed is every stage's seed")
    for extra in recipe.extras:
        check(extra in EXTRAS, raw, "extras", f"unknown extra {extra!r} ({', '.join(EXTRAS)})")
    return recipe


# ---------------------------------------------------------------------------------------------------------
# Stages


def _stage(name: str, done: bool) -> bool:
    console.print(f"[dim]· {name}: done, skipping[/dim]" if done else f"[bold]· {name}[/bold]")
    return not done


def record_text(rec: dict) -> str:
    """The text of a task row, for in-domain pretraining: the input and, for generation, the answer."""
    if isinstance(rec.get("text"), str):
        return rec["text"]
    if isinstance(rec.get("prompt"), str):
        return rec["prompt"] + str(rec.get("completion") or "")
    if isinstance(rec.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in rec["messages"] if isinstance(m, dict))
    return ""


def _run_loader(loader: str, options: dict, data_dir: str | Path | None, out: Path, seed: int) -> dict:
    """A task data loader into out, reading the source data folder unless the loader makes its own data."""
    from slmforge.data.tasks import GENERATED, prepare

    return prepare(loader, resolve_data_dir(data_dir) if loader not in GENERATED else None, out, seed, **options)


def _extra_pretrain_text(recipe: Recipe, run: Path, data_dir: str | Path | None, data: Path) -> tuple[list[str], list]:
    """The texts of recipe.data.pretrain_extra (each loader run into run/extra/), less every document that
    shares a 13-word n-gram with the task's val or test inputs (GPT-3's contamination test)."""
    from slmforge.data.tasks.splits import normalize, word_ngrams

    if not recipe.data.pretrain_extra:
        return [], []
    held: set[int] = set()
    for f in (recipe.data.val, recipe.data.test):
        if f and (data / f).is_file():
            for _, rec in _records(data / f):
                held |= word_ngrams(normalize(record_text(rec)).split(), 13)
    texts, report = [], []
    for i, spec in enumerate(recipe.data.pretrain_extra):
        out = run / "extra" / f"{i}-{spec.loader}"
        if not (out / "stats.json").is_file():
            _run_loader(spec.loader, spec.options, data_dir, out, recipe.seed)
        docs, files = [], spec.files or [f for f in ("train.jsonl", "val.jsonl", "test.jsonl") if (out / f).is_file()]
        for f in files:
            if not (out / f).is_file():
                raise SlmforgeError(f"{recipe.path}: field 'data.pretrain_extra[{i}].files': the {spec.loader} "
                                    f"loader wrote no {f}")
            docs += [record_text(rec) for _, rec in _records(out / f)]
        kept = [d for d in docs if d and not word_ngrams(normalize(d).split(), 13) & held]
        texts += kept
        report.append({"loader": spec.loader, "files": files, "documents": len(kept),
                       "dropped_sharing_a_held_out_13gram": len(docs) - len(kept)})
        console.print(f"  extra pretraining text: {spec.loader} {len(kept):,} documents "
                      f"({len(docs) - len(kept)} dropped: a 13-gram of a val/test input)")
    return texts, report


def _train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> None:
    from slmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(texts, vocab_size)
    write_dir_atomically(out, tok.save)


def _budget(minutes: float | None, scale: float) -> float | None:
    return minutes * scale if minutes is not None else None


def _pretrain(recipe: Recipe, run: Path, data: Path, scale: float) -> dict:
    """Corpus from the task's training text -> packed tokens -> pretrain (train() fits the time budget)."""
    from slmforge.config import preset
    from slmforge.data.pack import pack_tokens, read_index
    from slmforge.tokenizer import Tokenizer
    from slmforge.train.pretrain import pretrain

    spec, mspec = recipe.pretrain, recipe.model
    corpus, packed, out = run / "pretrain_corpus.jsonl", run / "packed", run / "pretrain"
    tok = Tokenizer.from_dir(run / "tokenizer")
    if _stage("pack the pretraining corpus", (packed / "index.json").is_file()):
        pack_tokens([corpus], tok, packed, val_fraction=0.02, seed=recipe.seed, progress=False)
    index = read_index(packed)
    cfg = preset(mspec.preset, vocab_size=tok.vocab_size, max_position_embeddings=mspec.context, **mspec.overrides)
    pcfg = replace(spec, seq_len=min(spec.seq_len, mspec.context), seed=recipe.seed,
                   max_minutes=_budget(spec.max_minutes, scale))
    budget = f"{pcfg.max_minutes:g} min, " if pcfg.max_minutes else ""
    if _stage(f"pretrain {cfg.n_params / 1e6:.2f}M params ({budget}at most {pcfg.max_steps} steps; corpus "
              f"{index['splits']['train']['tokens'] / 1e6:.2f}M tokens)", (out / "model" / "model.safetensors").is_file()):
        pretrain(packed, out, cfg, tok, pcfg)
    meta = read_json(out / "model" / "slmforge.json")
    return {"params": cfg.n_params, "corpus_tokens": index["splits"]["train"]["tokens"],
            "corpus_documents": index["splits"]["train"]["documents"], **meta.get("metrics", {})}


def _scratch_model(recipe: Recipe, run: Path) -> Path:
    from slmforge.config import preset
    from slmforge.model import LlamaModel
    from slmforge.modeldir import save_model_dir
    from slmforge.tokenizer import Tokenizer

    out = run / "scratch" / "model"
    if not (out / "model.safetensors").is_file():
        tok = Tokenizer.from_dir(run / "tokenizer")
        m = recipe.model
        model = LlamaModel(preset(m.preset, vocab_size=tok.vocab_size, max_position_embeddings=m.context,
                                  **m.overrides))
        model.reset_parameters(seed=recipe.seed)
        save_model_dir(out, model, tok, {"stage": "init", "init": "random", "seed": recipe.seed})
    return out


def _finetune(recipe: Recipe, v: VariantSpec, init: Path, data: Path, out: Path, scale: float) -> dict:
    from slmforge.modeldir import ModelDir
    from slmforge.train.finetune import finetune

    s = v.finetune
    train_path = data / v.train
    val_path = data / v.val if v.val else (data / recipe.data.val if (data / recipe.data.val).is_file() else None)
    if v.val and not val_path.is_file():
        raise SlmforgeError(f"{recipe.path}: variant {v.name}: val file {val_path} not found")
    context = ModelDir.open(init).config.max_position_embeddings
    cfg = replace(s, seq_len=min(s.seq_len, context - 1), seed=recipe.seed, max_minutes=_budget(s.max_minutes, scale),
                  merge=s.merge or s.mode == "lora")  # the recipe predicts with the merged model
    return finetune(init, train_path, out, cfg, val_path=val_path)


def _variant_row(recipe: Recipe, v: VariantSpec, vdir: Path, pre: dict | None, rows: dict) -> dict:
    """One line of the comparison: what was trained, how big, how long, how good."""
    metrics = read_json(vdir / "metrics.json")
    ftj = read_json(vdir / "finetune.json") if (vdir / "finetune.json").is_file() else None
    init_cost = 0.0
    if v.ensemble:  # pretraining once, then every member's fine-tuning
        members = [rows[n] for n in v.ensemble]
        init_cost = max(m["total_train_s"] - m["finetune_s"] for m in members) + sum(m["finetune_s"] for m in members)
    elif v.init == "pretrained" and pre:
        init_cost = pre.get("train_time_s") or 0.0
    elif v.init.startswith("variant:"):
        init_cost = rows[v.init.split(":", 1)[1]]["total_train_s"]
    if v.ensemble:
        head = "tagger"
    elif v.finetune:
        head = {"classify": v.finetune.head, "tag": "tagger"}.get(v.finetune.task, "-")
    else:
        head = "-"
    row = {"variant": v.name, "init": f"ensemble of {' + '.join(v.ensemble)}" if v.ensemble else v.init,
           "note": v.note, "mode": v.finetune.mode if v.finetune else "-", "head": head}
    if ftj:
        m = ftj["metrics"]
        row |= {"params": m["total_params"], "trainable_params": m["trainable_params"],
                "finetune_s": m["train_time_s"], "steps": m["steps"], "best_step": m["best_step"],
                "val_loss": m.get("val_loss"), "val_accuracy": m.get("val_accuracy"),
                "val_macro_f1": m.get("val_macro_f1"), "val_tag_f1": m.get("val_tag_f1")}
    else:
        from slmforge.modeldir import ModelDir

        if v.ensemble:  # every member runs (a LoRA member merged: its adapters are gone)
            n = sum(ModelDir.open(vdir.parent / m / "model").config.n_params for m in v.ensemble)
        else:
            n = ModelDir.open(vdir / "model").config.n_params if (vdir / "model").exists() else None
        row |= {"params": n, "trainable_params": 0, "finetune_s": 0.0, "steps": 0}
    row["total_train_s"] = round(init_cost + row["finetune_s"], 1)
    row["metric"] = metrics.get(recipe.eval.metric)
    val = read_json(vdir / "val_metrics.json") if (vdir / "val_metrics.json").is_file() else {}
    row["val_metric"] = val.get(recipe.eval.metric)
    row["val_metrics"] = {k: v for k, v in val.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    row["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return row


def _copy_dir(src: Path, out: Path) -> None:
    write_dir_atomically(out, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))


def _hdfs_parse(data_dir: Path, best_model: Path, top_g: int, run: Path) -> dict:
    """Raw HDFS lines -> event templates (agreement with loghub's parse), and the sessions of those raw
    lines scored by the best model (no labels exist for them: the share flagged is reported)."""
    from slmforge.data.tasks import hdfs_parse_agreement, hdfs_sessions_from_log
    from slmforge.infer.predict import deeplog_scores

    agreement = hdfs_parse_agreement(data_dir)
    folder = data_dir / "loghub" / "HDFS"
    sessions = hdfs_sessions_from_log(folder / "HDFS_2k.log", folder / "HDFS_templates.csv")
    scored = deeplog_scores(best_model, list(sessions.values()), top_g)
    rows = [json.dumps({"id": b, "events": ev, "prediction": "anomalous" if s["anomalous"] else "normal"})
            for (b, ev), s in zip(sessions.items(), scored, strict=True)]
    atomic_write_text(run / "raw_log_predictions.jsonl", "".join(r + "\n" for r in rows))
    flagged = sum(s["anomalous"] for s in scored)
    return {"parse": {k: v for k, v in agreement.items() if k != "disagreements"},
            "raw_log_sessions": len(scored), "raw_log_flagged_anomalous": flagged,
            "raw_log_flagged_pct": 100.0 * flagged / max(len(scored), 1)}


REDTEAM_PROBES = "redteam_probes.jsonl"  # written by the loader (support_chat_safety): held-out behaviours


def _redteam(data: Path, run: Path, variants: list[str]) -> dict:
    """Every variant's model scanned (slmforge redteam scan) on the loader's held-out probes: one greedy reply
    of at most 48 tokens each, success by the refusal rules (a harmful request not refused is an attack
    success; a benign one refused is over-refusal). Each scan is in variants/<v>/redteam/ and resumes."""
    from slmforge.safety.scan import ScanConfig, scan

    probes = data / REDTEAM_PROBES
    if not probes.is_file():
        raise SlmforgeError(f"extra redteam: {probes} was not written by the loader (use loader support_chat_safety "
                            f"or write held-out probes there)")
    out = {}
    for name in variants:
        vdir = run / "variants" / name
        summary = scan(ScanConfig(target=str(vdir / "model"), probes=[str(probes)], out=str(vdir / "redteam"), n=1,
                                  temperature=0.0, max_tokens=48, progress=False))
        out[name] = {s: {k: row[k] for k in ("metric", "rate", "ci", "probes", "behaviors", "refusal_rate")}
                     for s, row in summary["suites"].items()}
        out[name]["categories"] = {s: {c: [row["rate"], row["ci"]] for c, row in cats.items()}
                                   for s, cats in summary["categories"].items()}
    return out


def _deeplog_protocol(path: Path, best_model: Path, top_g: int) -> dict:
    """The shipped model on DeepLog's own protocol (every held-out normal session and every abnormal one,
    repeats and sessions seen in train included; hdfs.py's test_deeplog.jsonl, each distinct session once
    with its count), for comparison with DeepLog's published figures. Also the recall on the abnormal
    sessions that are prefixes of normal training sessions, and with the end of session not ranked (the
    model as it was before: only its events ranked)."""
    from slmforge.evaluate.tasks import binary_metrics
    from slmforge.infer.predict import deeplog_scores

    rows = list(read_jsonl(path))
    scored = deeplog_scores(best_model, [r["events"] for r in rows], top_g)

    def figures(flag: list[bool], keep: list[bool]) -> dict:
        y_true = [r["label"] for r, k in zip(rows, keep, strict=True) for _ in range(r["count"]) if k]
        y_pred = ["anomalous" if f else "normal" for r, f, k in zip(rows, flag, keep, strict=True)
                  for _ in range(r["count"]) if k]
        return binary_metrics(y_true, y_pred, positive="anomalous")

    every = [True] * len(rows)
    with_end = [s["anomalous"] for s in scored]
    events_only = [s["anomalous_by_events"] for s in scored]
    cut = [r["label"] == "anomalous" and r["prefix_of_train"] for r in rows]
    unseen = [not r["seen_in_train"] for r in rows]
    return {"top_g": top_g, "sessions": sum(r["count"] for r in rows), "distinct": len(rows),
            "abnormal": sum(r["count"] for r in rows if r["label"] == "anomalous"),
            "abnormal_prefix_of_train": sum(r["count"] for r, c in zip(rows, cut, strict=True) if c),
            "normal_seen_in_train": sum(r["count"] for r in rows if r["seen_in_train"]),
            "all": figures(with_end, every), "unseen_in_train": figures(with_end, unseen),
            "all_events_only": figures(events_only, every),
            "recall_on_prefix_sessions": figures(with_end, cut)["recall"],
            "recall_on_prefix_sessions_events_only": figures(events_only, cut)["recall"]}


def _sweep_length_penalty(p: PredictSpec, val_path: Path, vdir: Path, predict_and_score, recipe: Recipe) -> dict:
    """Decode val with each length penalty of the sweep (into val_lp<value>/), score it, and choose the best
    (the first of equals); the chosen decoding is then copied to val_predictions.jsonl / val_metrics.json."""
    scores = {}
    for lp in p.sweep_length_penalty:
        d = vdir / f"val_lp{lp:g}"
        d.mkdir(exist_ok=True)
        predict_and_score(val_path, d / "val_predictions.jsonl", d / "val_metrics.json", p.top_g,
                          p=replace(p, length_penalty=lp))
        scores[lp] = read_json(d / "val_metrics.json")[recipe.eval.metric]
    chosen = max(scores, key=lambda lp: (scores[lp], -p.sweep_length_penalty.index(lp)))
    for name in ("val_predictions.jsonl", "val_metrics.json", "val_predict.json"):
        src = vdir / f"val_lp{chosen:g}" / name
        if src.is_file() and not (vdir / name).is_file():
            shutil.copyfile(src, vdir / name)
    console.print(f"  length penalty on val: {', '.join(f'{k:g}: {_fmt(x)}' for k, x in scores.items())} "
                  f"-> {chosen:g}")
    return {"values": list(scores), "val": {f"{k:g}": x for k, x in scores.items()}, "chosen": chosen}


def _sweep_top_g(vdir: Path, values: list[int], recipe: Recipe) -> dict:
    """DeepLog's g chosen on val: a session is anomalous when an event is unknown or ranked below g, so
    every g is scored from one prediction pass (its max_rank) and the best val metric wins (smallest g on
    ties)."""
    from slmforge.evaluate.tasks import evaluate_predictions

    preds = vdir / "val_predictions.jsonl"
    rows = list(read_jsonl(preds))
    e, scores = recipe.eval, {}

    def relabel(g: int, path: Path) -> dict:
        atomic_write_text(path, "".join(json.dumps({**r, "prediction": "anomalous" if r.get("unknown_events") or (
            r.get("max_rank") is not None and r["max_rank"] > g) else "normal"}, ensure_ascii=False) + "\n"
            for r in rows))
        return evaluate_predictions(e.task, path, positive=e.positive)

    for g in sorted(values):
        scores[g] = relabel(g, vdir / ".val_top_g.jsonl").get(e.metric)
    (vdir / ".val_top_g.jsonl").unlink()
    chosen = max(scores, key=lambda g: (scores[g] if scores[g] is not None else -math.inf, -g))
    write_json(vdir / "val_metrics.json", relabel(chosen, preds))  # val as the chosen g labels it
    result = {"chosen": chosen, "val": {str(g): s for g, s in scores.items()}}
    write_json(vdir / "top_g.json", result)
    return result


def _peak_rss_mib() -> float:
    """This process's peak resident memory: the run's whole footprint (stages run in one process)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


def run_recipe(recipe_path: str | Path | Recipe, out: str | Path | None = None, data_dir: str | Path | None = None,
               minutes_scale: float = 1.0, variants: list[str] | None = None) -> dict:
    """Run (or resume) a recipe (a file, a bundled name, or a loaded Recipe); returns the report (also
    out/report.json and out/report.md)."""
    from slmforge.evaluate.tasks import evaluate_predictions
    from slmforge.infer.predict import predict_file

    recipe = recipe_path if isinstance(recipe_path, Recipe) else load_recipe(recipe_path)
    if minutes_scale <= 0:
        raise SlmforgeError(f"minutes scale must be > 0, got {minutes_scale}")
    run = Path(out) if out else Path("runs") / recipe.name
    run.mkdir(parents=True, exist_ok=True)
    data = run / "data"
    # Stage seconds, summed over the runs that did the work and kept in the run folder, so a resumed run
    # reports what its stages cost rather than 0 s for the ones an earlier run finished.
    timings_path = run / "timings.json"
    timings: dict[str, float] = read_json(timings_path) if timings_path.is_file() else {}

    def timed(key: str, t0: float, was_done: bool) -> None:
        if not was_done:
            timings[key] = timings.get(key, 0.0) + time.time() - t0
            write_json(timings_path, timings)

    t_start = time.time()
    chosen = [v for v in recipe.variants if not variants or v.name in variants]
    if variants:
        unknown = sorted(set(variants) - {v.name for v in recipe.variants})
        if unknown:
            raise SlmforgeError(f"{recipe.path}: no variant {unknown[0]!r}")

    t, was_done = time.time(), (run / "data.json").is_file()
    if _stage(f"task data ({recipe.data.loader})", was_done):
        stats = _run_loader(recipe.data.loader, recipe.data.options, data_dir, data, recipe.seed)
        write_json(run / "data.json", stats)
    data_stats = read_json(run / "data.json")
    test_path = data / recipe.data.test if recipe.data.test else None
    if test_path is not None and not test_path.is_file():
        raise SlmforgeError(f"{recipe.path}: field 'data.test': {test_path} was not written by the loader")
    val_path = data / recipe.data.val if (data / recipe.data.val).is_file() else None
    overlap = overlap_of(data_stats)
    for name, o in overlap.items():
        console.print(f"  overlap {name}: {describe_overlap(o)}")
    timed("data_s", t, was_done)

    pre = None
    if recipe.model:
        t, was_done = time.time(), (run / "tokenizer" / "tokenizer.json").is_file()
        if _stage(f"in-domain tokenizer ({recipe.model.vocab_size} tokens)", was_done):
            files = recipe.data.pretrain_text
            texts = [record_text(rec) for f in files for _, rec in _records(data / f)]
            extra, extra_report = _extra_pretrain_text(recipe, run, data_dir, data)
            write_json(run / "pretrain_corpus.jsonl.meta", {"files": files, "documents": len(texts),
                                                            "extra": extra_report})
            atomic_write_text(run / "pretrain_corpus.jsonl", "".join(
                json.dumps({"text": x}, ensure_ascii=False) + "\n" for x in texts + extra if x))
            _train_tokenizer(texts, recipe.model.vocab_size, run / "tokenizer")
        timed("tokenizer_s", t, was_done)
        if recipe.pretrain:
            t, was_done = time.time(), (run / "pretrain" / "model" / "model.safetensors").is_file()
            pre = _pretrain(recipe, run, data, minutes_scale)
            timed("pretrain_s", t, was_done)
    judged = None
    if recipe.judge:
        t, was_done = time.time(), (run / "judge.json").is_file()
        if _stage("judge the pretrained model (bits per byte, samples)", was_done):
            write_json(run / "judge.json", _judge(recipe, run, data, val_path))
        judged = read_json(run / "judge.json")
        timed("judge_s", t, was_done)
    if not recipe.variants:
        return _finish(recipe, run, data_stats, overlap, pre, judged, timings, t_start, minutes_scale)

    rows: dict[str, dict] = {}
    for v in chosen:
        vdir = run / "variants" / v.name
        vdir.mkdir(parents=True, exist_ok=True)
        if v.ensemble:
            init = None
        elif v.init == "scratch":
            init = _scratch_model(recipe, run)
        elif v.init == "pretrained":
            init = run / "pretrain" / "model"
        else:
            init = run / "variants" / v.init.split(":", 1)[1] / "model"
            if not (init / "model.safetensors").is_file():
                raise SlmforgeError(f"{recipe.path}: variant {v.name} starts from {v.init}, which has not run "
                                    f"(run it too)")
        t, was_done = time.time(), (vdir / ("finetune.json" if v.finetune else "model")).exists()
        if v.ensemble:
            if _stage(f"{v.name}: ensemble of {', '.join(v.ensemble)}", was_done):
                from slmforge.train.heads import save_tagger_ensemble

                save_tagger_ensemble([run / "variants" / n / "model" for n in v.ensemble], vdir / "model")
        elif v.finetune is None:
            if not was_done:
                _copy_dir(init, vdir / "model")
        elif _stage(f"{v.name}: fine-tune ({v.finetune.mode}, from {v.init})", was_done):
            _finetune(recipe, v, init, data, vdir, minutes_scale)
        timed(f"{v.name}.finetune_s", t, was_done)

        p = v.predict or recipe.predict

        def predict_and_score(path: Path, preds: Path, metrics_path: Path, top_g: int,
                              v: VariantSpec = v, vdir: Path = vdir, p: PredictSpec = p) -> None:
            e = recipe.eval
            if _stage(f"{v.name}: predict {path.relative_to(data)}", preds.is_file()):
                stats = predict_file(vdir / "model", p.mode, path, preds, labels=p.labels, max_tokens=p.max_tokens,
                                     stop=p.stop, batch_size=p.batch_size, top_g=top_g, top_k=p.top_k,
                                     limit=p.limit, progress=console.is_terminal, beams=p.beams,
                                     length_penalty=p.length_penalty)
                write_json(preds.parent / preds.name.replace("predictions.jsonl", "predict.json"), stats)
            if _stage(f"{v.name}: evaluate {path.relative_to(data)}", metrics_path.is_file()):
                write_json(metrics_path, evaluate_predictions(e.task, preds, labels=e.labels or p.labels,
                                                              positive=e.positive, ks=e.ks, tokenize=e.tokenize))

        # Validation first: it alone chooses this variant's tuned numbers (top_g, the length penalty) and,
        # below, the variant.
        t, was_done = time.time(), (vdir / "val_metrics.json").is_file()
        sweep, lp_sweep = None, None
        if val_path and p.sweep_length_penalty:
            lp_sweep = _sweep_length_penalty(p, val_path, vdir, predict_and_score, recipe)
            p = replace(p, length_penalty=lp_sweep["chosen"])
        if val_path:
            predict_and_score(val_path, vdir / "val_predictions.jsonl", vdir / "val_metrics.json",
                              max(p.sweep_top_g, default=p.top_g), p=p)
            if p.sweep_top_g:
                sweep = _sweep_top_g(vdir, p.sweep_top_g, recipe)
        timed(f"{v.name}.val_s", t, was_done)
        top_g = sweep["chosen"] if sweep else p.top_g
        t, was_done = time.time(), (vdir / "metrics.json").is_file()
        predict_and_score(test_path, vdir / "predictions.jsonl", vdir / "metrics.json", top_g, p=p)
        timed(f"{v.name}.predict_s", t, was_done)
        rows[v.name] = _variant_row(recipe, v, vdir, pre, rows)
        rows[v.name]["predict_s"] = read_json(vdir / "predict.json")["seconds"] \
            if (vdir / "predict.json").is_file() else None
        if sweep:
            rows[v.name]["top_g"] = sweep
        if lp_sweep:
            rows[v.name]["length_penalty"] = lp_sweep
        console.print(f"  {v.name}: {recipe.eval.metric} = {_fmt(rows[v.name]['val_metric'])} on val, "
                      f"{_fmt(rows[v.name]['metric'])} on test")

    # The shipped model is the best on validation; the test figures are reported, never used to choose.
    if val_path:
        chosen = max(rows.values(), key=lambda r: r["val_metric"] if r["val_metric"] is not None else -math.inf)
    elif len(rows) == 1:
        chosen = next(iter(rows.values()))
    else:
        raise SlmforgeError(f"{recipe.path}: field 'data.val': {data / recipe.data.val} not written by the loader; "
                            f"variants are chosen on validation data")
    _copy_dir(run / "variants" / chosen["variant"] / "model", run / "model")
    extras = {}
    top_g = chosen["top_g"]["chosen"] if chosen.get("top_g") else recipe.predict.top_g  # as val chose it
    if "hdfs_parse" in recipe.extras:
        extras["hdfs_parse"] = _hdfs_parse(resolve_data_dir(data_dir), run / "model", top_g, run)
    if "deeplog_protocol" in recipe.extras:
        extras["deeplog_protocol"] = _deeplog_protocol(data / "test_deeplog.jsonl", run / "model", top_g)
    if "redteam" in recipe.extras:
        extras["redteam"] = _redteam(data, run, list(rows))

    report = {"recipe": recipe.name, "description": recipe.description, "recipe_file": recipe.path,
              "metric": recipe.eval.metric, "chosen_variant": chosen["variant"],
              "chosen_on": f"{recipe.eval.metric} on {recipe.data.val}" if val_path else "the only variant",
              "model_dir": str(run / "model"),
              "data": {"loader": recipe.data.loader, "options": recipe.data.options,
                       "counts": data_stats.get("counts") or {k: v.get("counts") for k, v in data_stats.items()
                                                              if isinstance(v, dict)},
                       "overlap": overlap},
              "test_file": str(test_path), "val_file": str(val_path) if val_path else None, "pretrain": pre,
              "variants": list(rows.values()), "peak_rss_mib": _peak_rss_mib(),
              "extras": extras, "minutes_scale": minutes_scale,
              "timings_s": {k: round(x, 1) for k, x in timings.items()},
              "wall_time_s": round(time.time() - t_start, 1),  # this run only; timings_s sum over resumes
              "recipe_config": asdict(recipe)}
    write_json(run / "report.json", report)
    atomic_write_text(run / "report.md", report_markdown(report))
    console.print(f"chosen on validation: {chosen['variant']} ({recipe.eval.metric} {_fmt(chosen['val_metric'])} on "
                  f"val, {_fmt(chosen['metric'])} on test) · model: {run / 'model'} · report: {run / 'report.md'}")
    return report


def _judge(recipe: Recipe, run: Path, data: Path, val_path: Path | None) -> dict:
    """Bits per byte of the pretrained model on the loader's val split (its first max_val_docs rows) and on
    each judge file, beside each reference model on the same files; and a few samples."""
    from slmforge.evaluate.perplexity import judge, score_documents
    from slmforge.infer.engine import SamplingParams, generate_text
    from slmforge.modeldir import ModelDir

    j, model_dir = recipe.judge, run / "pretrain" / "model"
    files = [Path(f) for f in j.files]
    md = ModelDir.open(model_dir)
    model, tok = md.load_model().eval(), md.load_tokenizer()
    val = [record_text(r) for _, r in _records(val_path)][:j.max_val_docs] if val_path else []
    val_bpb = score_documents(model, tok, [x for x in val if x])["bits_per_byte"] if val else None
    table = [(f"{recipe.data.val} (this model)", val_bpb)] if val_bpb is not None else []
    ours = judge(model_dir, files)["files"] if files else []
    table += [(f"{Path(f['file']).name} (this model)", f["bits_per_byte"]) for f in ours]
    refs = {}
    for ref in j.references:
        refs[ref] = {f["file"]: round(f["bits_per_byte"], 4) for f in judge(ref, files)["files"]} if files else {}
        table += [(f"{Path(f).name} ({ref})", v) for f, v in refs[ref].items()]
    samples = []
    for i, prompt in enumerate(j.prompts[:j.samples]):
        params = SamplingParams(max_new_tokens=j.sample_tokens, temperature=0.8, top_p=0.95, seed=recipe.seed + i)
        samples.append(prompt + generate_text(model, tok, prompt, params))
    return {"val_bits_per_byte": round(val_bpb, 4) if val_bpb is not None else None,
            "files": {f["file"]: round(f["bits_per_byte"], 4) for f in ours}, "references": refs,
            "table": [(name, round(v, 4)) for name, v in table], "samples": samples}


def _finish(recipe: Recipe, run: Path, data_stats: dict, overlap: dict, pre: dict | None, judged: dict | None,
            timings: dict, t_start: float, minutes_scale: float) -> dict:
    """The report of a recipe without variants: the data, the pretrained model and its judge."""
    report = {"recipe": recipe.name, "description": recipe.description, "recipe_file": recipe.path,
              "model_dir": str(run / "pretrain" / "model"),
              "data": {"loader": recipe.data.loader, "options": recipe.data.options,
                       "counts": data_stats.get("counts"), "overlap": overlap},
              "pretrain": pre, "judge": judged, "variants": [], "peak_rss_mib": _peak_rss_mib(),
              "minutes_scale": minutes_scale, "timings_s": {k: round(x, 1) for k, x in timings.items()},
              "wall_time_s": round(time.time() - t_start, 1), "recipe_config": asdict(recipe)}
    write_json(run / "report.json", report)
    atomic_write_text(run / "report.md", report_markdown(report))
    for s in (judged or {}).get("samples", []):
        console.print(f"[green]{s}[/green]\n")
    if pre:
        console.print(f"val loss {_fmt(pre.get('val_loss'))} · {pre['params'] / 1e6:.2f}M params · "
                      f"{_fmt(pre.get('tokens_per_s'))} tokens/s · {_fmt(pre.get('steps'))} steps")
    for name, bpb in (judged or {}).get("table", []):
        console.print(f"bits/byte {bpb:.3f} · {name}")
    console.print(f"model: {report['model_dir']}\nreport: {run / 'report.md'}\n"
                  f"try:   slmforge generate {report['model_dir']} \"Once upon a time\"")
    return report


def _records(path: Path):
    from slmforge.train.rows import read_records

    return read_records(path)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.2f}" if abs(x) < 1e4 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def report_markdown(r: dict) -> str:
    """The report as Markdown: data and its overlap, pretraining, the variant comparison, extras."""
    lines = [f"# {r['recipe']}: recipe report", "", r["description"].strip(), "",
             f"Data: `{r['data']['loader']}` {json.dumps(r['data']['counts'])}" + (
                 f"; variants chosen on `{r.get('val_file')}`, scored once each on `{r['test_file']}`." if r["variants"]
                 else "."), ""]
    for name, o in r["data"].get("overlap", {}).items():
        lines.append(f"- overlap of {name} with train: {describe_overlap(o)}")
    pre = r.get("pretrain")
    if pre:
        lines += ["", f"Pretraining on the task's own training text: {_fmt(pre['params'])} params, {pre['steps']} "
                  f"steps, corpus {_fmt(pre['corpus_tokens'])} tokens ({_fmt(pre['corpus_documents'])} documents), "
                  f"val loss {_fmt(pre.get('val_loss'))}, {_fmt(pre.get('tokens_per_s'))} tokens/s, "
                  f"{_fmt(pre.get('train_time_s'))} s. Loss curve: `pretrain/loss_curve.png`."]
    judged = r.get("judge")
    if judged:
        lines += ["", "## Bits per byte (lower is better; comparable across tokenizers)", "",
                  "| text (model) | bits/byte |", "|---|---|"]
        lines += [f"| {name} | {v} |" for name, v in judged["table"]]
        lines += ["", "## Samples (temperature 0.8, top-p 0.95)", ""]
        lines += ["> " + s.replace("\n", "\n> ") + "\n" for s in judged["samples"]]
    if not r["variants"]:
        lines += ["", "Stage times (s, summed over resumed runs): " + ", ".join(
            f"{k} {v}" for k, v in r["timings_s"].items()) + f"; wall of this run {r['wall_time_s']} s.", ""]
        return "\n".join(lines)
    m = r["metric"]
    lines += ["", f"| variant | init | mode | head | params | trainable | fine-tune s | total train s | steps | "
              f"{m} (val) | {m} (test) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in r["variants"]:
        lines.append(f"| {v['variant']} | {v['init']} | {v['mode']} | {v['head']} | {_fmt(v['params'])} | "
                     f"{_fmt(v['trainable_params'])} | {_fmt(v['finetune_s'])} | {_fmt(v['total_train_s'])} | "
                     f"{_fmt(v['steps'])} | {_fmt(v.get('val_metric'))} | {_fmt(v['metric'])} |")
    lines += ["", f"Chosen on validation ({r['chosen_on']}): {r['chosen_variant']}, copied to `{r['model_dir']}`. "
              f"Test figures are reported only, never used to choose."]
    for v in r["variants"]:
        if v.get("top_g"):
            lines.append(f"- {v['variant']}: top_g {v['top_g']['chosen']} chosen on val "
                         f"({', '.join(f'g={g}: {_fmt(x)}' for g, x in v['top_g']['val'].items())})")
    keys = sorted({k for v in r["variants"] for k in v["metrics"]} - {"n"})
    lines += ["", "All test metrics:", "", "| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for v in r["variants"]:
        lines.append(f"| {v['variant']} | " + " | ".join(_fmt(v["metrics"].get(k)) for k in keys) + " |")
    for name, extra in r.get("extras", {}).items():
        lines += ["", f"## {name}", "", "```json", json.dumps(extra, indent=2), "```"]
    lines += ["", "Stage times (s, summed over resumed runs): " + ", ".join(f"{k} {v}" for k, v in r["timings_s"].items()),
              f"; wall of this run {r['wall_time_s']} s (minutes scale {r['minutes_scale']}); peak memory "
              f"{_fmt(r.get('peak_rss_mib'))} MiB.", ""]
    return "\n".join(lines)
