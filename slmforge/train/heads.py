"""What fine-tuning trains on top of the decoder: LoRA (peft), a classifier head on the last token's hidden
state, an O/B/I token tagger; their losses and validation metrics, their predictions, and their files
(classifier_head.safetensors, tagger_head.safetensors; merge_lora folds an adapter into its base).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from slmforge.errors import SlmforgeError, first_line
from slmforge.model import LlamaModel
from slmforge.modeldir import ModelDir, save_model_dir
from slmforge.tokenizer import Tokenizer

if TYPE_CHECKING:
    from slmforge.train.finetune import FinetuneConfig
from slmforge.train.rows import IGNORE, TAGS, Example, collate, collate_tags, encode_records, pad_id_of

HEAD_FILE = "classifier_head.safetensors"
TAGGER_HEAD_FILE = "tagger_head.safetensors"


# ---------------------------------------------------------------------------------------------------------
# Models: LoRA, the classifier head, losses


def base_model(model: nn.Module) -> LlamaModel:
    """The LlamaModel inside a PeftModel (LoRA layers are swapped in place, so its submodules use them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class SequenceClassifier(nn.Module):
    """A language model plus a linear head on the last real token's final hidden state (`score`, the name
    transformers' LlamaForSequenceClassification uses)."""

    def __init__(self, lm: nn.Module, n_labels: int):
        super().__init__()
        self.lm = lm
        self.score = nn.Linear(base_model(lm).config.hidden_size, n_labels, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)

    def forward(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        h = base_model(self.lm).hidden_states(x)
        pooled = h[torch.arange(x.shape[0], device=x.device), last]
        return self.score(pooled)


class TokenTagger(nn.Module):
    """A language model plus a linear head on every token's final hidden state and the next token's (`score`).
    The model is causal, so a token's own state cannot tell whether the phrase it starts goes on; the next
    token's state can (one token of lookahead). Batches end in a pad column (collate_tags), so every real
    token has a next state and a row's tags do not depend on the batch it is in."""

    def __init__(self, lm: nn.Module, n_tags: int = len(TAGS)):
        super().__init__()
        self.lm = lm
        self.score = nn.Linear(2 * base_model(lm).config.hidden_size, n_tags, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = base_model(self.lm).hidden_states(x)
        ahead = torch.cat([h[:, 1:], torch.zeros_like(h[:, :1])], dim=1)
        return self.score(torch.cat([h, ahead], dim=-1))


def trainable_model(lm: LlamaModel, cfg: FinetuneConfig, labels: list[str] | None,
                    precision: str) -> tuple[nn.Module, nn.Module]:
    """(lm, model): the language model as cfg trains it (itself, or a peft LoRA model, its frozen projections
    in bf16 with base_dtype bfloat16) and the model the loss takes (lm, or lm with a classifier or tagger
    head). The recipe runner's timing probe builds the same thing."""
    if cfg.mode == "lora":
        lm = apply_lora(lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        if cfg.base_dtype == "bfloat16":
            if precision != "bf16":
                raise SlmforgeError("base_dtype bfloat16 needs precision bf16 (autocast)")
            frozen_linears_to_bf16(lm)
    if cfg.dropout:
        add_residual_dropout(lm, cfg.dropout)
    if cfg.classifier_head:
        return lm, SequenceClassifier(lm, len(labels or []))
    return lm, (TokenTagger(lm) if cfg.task == "tag" else lm)


def add_residual_dropout(model: nn.Module, p: float) -> int:
    """Dropout on the output of every attention and MLP sub-layer before it joins the residual stream
    (Vaswani et al.'s residual dropout), in training mode only: forward hooks, so the model file, its weights
    and its eval-mode logits stay as they are. Returns the number of sub-layers hooked."""
    from slmforge.model import MLP, Attention

    subs = [m for m in model.modules() if isinstance(m, (Attention, MLP))]
    for m in subs:
        m.register_forward_hook(lambda mod, args, out: F.dropout(out, p, mod.training))
    return len(subs)


def apply_lora(model: LlamaModel, r: int, alpha: int, dropout: float, targets: list[str]) -> nn.Module:
    """Wrap in a peft PeftModel: frozen base, trainable low-rank adapters on the named linear layers."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise SlmforgeError(f"lora targets {unknown}: no such linear layers (choose from {', '.join(sorted(names))})")
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets)))


def frozen_linears_to_bf16(model: nn.Module) -> int:
    """Store the frozen weights of linear layers inside the transformer blocks in bfloat16 (embeddings, norms
    and the adapters stay fp32). Returns the number of weights converted."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and ".layers." in f".{name}" and not m.weight.requires_grad:
            m.weight.data = m.weight.data.to(torch.bfloat16)
            n += m.weight.numel()
    return n


def lm_loss(model: nn.Module, batch: dict, label_smoothing: float = 0.0) -> torch.Tensor:
    if not label_smoothing:
        return model(batch["x"], batch["y"])[1]
    logits = model(batch["x"])[0]
    return F.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten(), ignore_index=IGNORE,
                           label_smoothing=label_smoothing)


def classifier_loss(model: nn.Module, batch: dict, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"], batch["last"]).float(), batch["label"], weight=batch.get("weight"),
                           label_smoothing=label_smoothing)


def tagger_loss(model: nn.Module, batch: dict, label_smoothing: float = 0.0) -> torch.Tensor:
    logits = model(batch["x"]).float()
    return F.cross_entropy(logits.flatten(0, 1), batch["tags"].flatten(), ignore_index=IGNORE,
                           label_smoothing=label_smoothing)


def loss_fn_of(cfg: FinetuneConfig):
    loss = tagger_loss if cfg.task == "tag" else classifier_loss if cfg.classifier_head else lm_loss
    if not cfg.label_smoothing:
        return loss
    return lambda model, batch: loss(model, batch, cfg.label_smoothing)


def tag_f1(pred: torch.Tensor, gold: torch.Tensor) -> float:
    """Token-level F1 of the phrase tags: a token counts when its predicted tag equals a gold B or I.
    IGNORE positions (bos, padding) are left out."""
    real = gold != IGNORE
    pred_pos, gold_pos = (pred != 0) & real, (gold > 0) & real
    denom = pred_pos.sum().item() + gold_pos.sum().item()
    return 2 * (gold_pos & (pred == gold)).sum().item() / denom if denom else 0.0


def balanced_class_weights(examples: list[Example], n_labels: int) -> torch.Tensor:
    """n / (k * count_c) per class, k the classes present in train (sklearn's "balanced"); an absent class
    gets weight 0."""
    counts = torch.bincount(torch.tensor([e.label for e in examples]), minlength=n_labels).float()
    k = int((counts > 0).sum())
    return torch.where(counts > 0, len(examples) / (k * counts.clamp(min=1)), torch.zeros_like(counts))


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, n_labels: int) -> float:
    """Macro-F1 over all n_labels classes (a class never predicted nor present scores 0, as in eval)."""
    f1s = []
    for c in range(n_labels):
        tp = ((pred == c) & (gold == c)).sum().item()
        denom = (pred == c).sum().item() + (gold == c).sum().item()
        f1s.append(2 * tp / denom if denom else 0.0)
    return sum(f1s) / n_labels


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, tied weights counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# ---------------------------------------------------------------------------------------------------------
# Predictions


@torch.no_grad()
def label_logliks(model: nn.Module, tok: Tokenizer, texts: list[str], labels: list[str], seq_len: int,
                  batch_size: int = 32) -> torch.Tensor:
    """(len(texts), len(labels)) summed log-probabilities of " label" + eos after CLASSIFY_PROMPT."""
    from slmforge.train.finetune import FinetuneConfig  # the rows' config; finetune.py imports this module

    cfg = FinetuneConfig(task="classify", head="generative")
    pad = pad_id_of(tok)
    rows = [(t, lab) for t in texts for lab in labels]
    scores = []
    for s in range(0, len(rows), batch_size):
        recs = [("", {"text": t, "label": lab}) for t, lab in rows[s:s + batch_size]]
        batch = collate(encode_records(recs, tok, cfg, seq_len, labels), pad, classifier=False)
        dev = next(base_model(model).parameters()).device
        logits = model(batch["x"].to(dev))[0].float()
        y = batch["y"].to(dev)
        logp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
        scores.append((logp * (y != IGNORE)).sum(1).cpu())
    return torch.cat(scores).view(len(texts), len(labels))


@torch.no_grad()
def classifier_logits(model: SequenceClassifier, tok: Tokenizer, texts: list[str], seq_len: int,
                      batch_size: int = 32) -> torch.Tensor:
    from slmforge.train.finetune import FinetuneConfig  # the rows' config; finetune.py imports this module

    cfg = FinetuneConfig(task="classify", head="classifier")
    dev = model.score.weight.device
    out = []
    for s in range(0, len(texts), batch_size):
        recs = [("", {"text": t, "label": "_"}) for t in texts[s:s + batch_size]]
        batch = collate(encode_records(recs, tok, cfg, seq_len, ["_"]), pad_id_of(tok), classifier=True)
        out.append(model(batch["x"].to(dev), batch["last"].to(dev)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def tag_probs(model: TokenTagger, tok: Tokenizer, texts: list[str], seq_len: int,
              batch_size: int = 16) -> list[tuple[list[tuple[int, int]], torch.Tensor]]:
    """Per text: the character span of each token the tagger saw (the first seq_len - 1 after bos) and the
    (tokens, 3) probabilities of O, B, I at those tokens."""
    dev = model.score.weight.device
    out = []
    for s in range(0, len(texts), batch_size):
        encoded = [tok.encode_with_offsets(t, bos=True) for t in texts[s:s + batch_size]]
        exs = [Example(ids[:seq_len], [], tags=[IGNORE] * len(ids[:seq_len])) for ids, _ in encoded]
        probs = torch.softmax(model(collate_tags(exs, pad_id_of(tok))["x"].to(dev)).float(), -1).cpu()
        for (ids, offsets), p in zip(encoded, probs, strict=True):
            n = min(len(ids), seq_len)
            start = 1 if tok.bos_id is not None else 0  # bos is not part of the text
            out.append((offsets[start:n], p[start:n]))
    return out


def load_tagger(model_dir: str | Path) -> tuple[TokenTagger, Tokenizer, dict]:
    """A fine-tuned tagger directory: (TokenTagger with the saved head, tokenizer, slmforge.json 'tagger')."""
    md = ModelDir.open(model_dir)
    info = md.meta.get("tagger")
    if not info:
        raise SlmforgeError(f"{md.path / 'slmforge.json'}: no 'tagger' entry (not a fine-tuned tagger: "
                            f"finetune --task tag)")
    head_path = md.path / TAGGER_HEAD_FILE
    if not head_path.is_file():
        raise SlmforgeError(f"{head_path}: missing (slmforge.json has a 'tagger' entry)")
    model = TokenTagger(md.load_model(), len(info["labels"]))
    model.score.load_state_dict(load_head(head_path).state_dict())
    return model.eval(), md.load_tokenizer(), info


ENSEMBLE_DIR = "ensemble"  # a tagger ensemble's other members: ensemble/1, ensemble/2, ...


def save_tagger_ensemble(members: list[str | Path], out: str | Path) -> Path:
    """One model directory whose taggers' O/B/I probabilities are averaged (`predict --task extract`): the
    first member's files, the others under ensemble/<i>/, listed in slmforge.json's "ensemble". The members
    must be taggers with one tokenizer and one seq_len (so their tokens line up); written atomically."""
    import shutil

    from slmforge.io import write_dir_atomically, write_json

    if len(members) < 2:
        raise SlmforgeError(f"an ensemble needs at least 2 taggers, got {len(members)}")
    dirs = [ModelDir.open(m) for m in members]
    first, shapes = dirs[0], []  # each member's (tokenizer fingerprint, seq_len): all must be the first's
    for md in dirs:
        info = md.meta.get("tagger")
        if not info:
            raise SlmforgeError(f"{md.path / 'slmforge.json'}: no 'tagger' entry (an ensemble averages taggers)")
        if md.meta.get("ensemble"):
            raise SlmforgeError(f"{md.path}: is an ensemble already (give its members)")
        shapes.append((md.load_tokenizer().fingerprint(), info["seq_len"]))
        if shapes[-1] != shapes[0]:
            raise SlmforgeError(f"{md.path}: its tokenizer or seq_len differs from {first.path}'s")

    def fill(tmp: Path) -> None:
        shutil.copytree(first.path, tmp, dirs_exist_ok=True)
        for i, m in enumerate(members[1:], 1):
            shutil.copytree(m, tmp / ENSEMBLE_DIR / str(i))
        write_json(tmp / "slmforge.json", first.meta | {
            "ensemble": [f"{ENSEMBLE_DIR}/{i}" for i in range(1, len(members))],
            "ensemble_of": [str(m) for m in members]})

    return write_dir_atomically(out, fill)


@torch.no_grad()
def tagger_probs(model_dir: str | Path, texts: list[str],
                 batch_size: int = 16) -> list[tuple[list[tuple[int, int]], torch.Tensor]]:
    """tag_probs of a tagger directory, or the mean over an ensemble's members (save_tagger_ensemble)."""
    md = ModelDir.open(model_dir)
    out = None
    members = [md.path, *(md.path / rel for rel in md.meta.get("ensemble", []))]
    for m in members:
        model, tok, info = load_tagger(m)
        probs = tag_probs(model, tok, texts, info["seq_len"], batch_size)
        out = probs if out is None else [(o, p + q) for (o, p), (_, q) in zip(out, probs, strict=True)]
    return [(o, p / len(members)) for o, p in out]


def load_classifier(model_dir: str | Path) -> tuple[nn.Module, Tokenizer, dict]:
    """A fine-tuned classification model directory: (model, tokenizer, its slmforge.json 'classifier' entry).
    With head "classifier" the model is a SequenceClassifier with the saved head."""
    md = ModelDir.open(model_dir)
    info = md.meta.get("classifier")
    if not info:
        raise SlmforgeError(f"{md.path / 'slmforge.json'}: no 'classifier' entry (not a fine-tuned classifier)")
    lm = md.load_model()
    if info["head"] != "classifier":
        return lm, md.load_tokenizer(), info
    head_path = md.path / HEAD_FILE
    if not head_path.is_file():
        raise SlmforgeError(f"{head_path}: missing (slmforge.json says head 'classifier')")
    model = SequenceClassifier(lm, len(info["labels"]))
    model.score.load_state_dict(load_head(head_path).state_dict())
    return model.eval(), md.load_tokenizer(), info


def predict_labels(model_dir: str | Path, texts: list[str], batch_size: int = 32) -> list[str]:
    """Labels for texts from a fine-tuned classification model directory (either head)."""
    model, tok, info = load_classifier(model_dir)
    labels, seq_len = info["labels"], info["seq_len"]
    if info["head"] == "classifier":
        scores = classifier_logits(model, tok, texts, seq_len, batch_size)
    else:
        scores = label_logliks(model, tok, texts, labels, seq_len, batch_size)
    return [labels[i] for i in scores.argmax(-1).tolist()]



def save_head(head: nn.Linear, path: Path) -> None:
    save_file({"score.weight": head.weight.detach().float().cpu().contiguous()}, str(path))


def load_head(path: Path) -> nn.Linear:
    """A head written by save_head, shaped by its saved weight (a tagger's reads two hidden states)."""
    weight = load_file(str(path))["score.weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight.data = weight
    return head



def merge_lora(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Fold a LoRA adapter into its base model (peft merge_and_unload) and write a plain model directory;
    a classifier or tagger head saved with the adapter comes along."""
    from peft import PeftModel

    adapter = Path(adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise SlmforgeError(f"{adapter / 'adapter_config.json'}: missing (not a peft adapter directory)")
    md = ModelDir.open(model_dir)
    try:
        peft_model = PeftModel.from_pretrained(md.load_model(), str(adapter))
    except (ValueError, RuntimeError, KeyError) as e:
        raise SlmforgeError(f"{adapter}: does not fit {md.path} ({first_line(e)})") from None
    merged = peft_model.merge_and_unload()
    meta_path = adapter / "slmforge.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.update(stage="merge-lora", merged_lora=True, adapter=str(adapter.resolve()),
                parent={**meta.get("parent", {}), "path": str(md.path.resolve())})
    head, head_file = None, HEAD_FILE
    for name in (HEAD_FILE, TAGGER_HEAD_FILE):
        if (adapter / name).is_file():
            head, head_file = load_head(adapter / name), name
    return save_with_head(Path(out_dir), merged, md.load_tokenizer(), head, meta, dtype, head_file)


def save_with_head(out: Path, lm: LlamaModel, tok: Tokenizer, head: nn.Linear | None, meta: dict, dtype: str,
                head_file: str = HEAD_FILE) -> Path:
    return save_model_dir(out, lm, tok, meta, dtype=dtype,
                          extra=None if head is None else lambda d: save_head(head, d / head_file))
