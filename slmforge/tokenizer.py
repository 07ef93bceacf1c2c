"""Tokenizer: byte-level BPE trained with HF `tokenizers`, special tokens, and a chat template.

On disk it is what transformers expects: tokenizer.json + tokenizer_config.json (with chat_template),
so `AutoTokenizer.from_pretrained(model_dir)` gives the same ids as `Tokenizer.from_dir(model_dir)`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from slmforge.errors import SlmforgeError
from slmforge.io import atomic_write_text

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS, END_OF_TURN)  # ids 0..6, in this order
MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # every byte must have a token

# Zephyr-style turns. Rendered by jinja2 here and by transformers' apply_chat_template alike.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class Tokenizer:
    """A tokenizers.Tokenizer plus the special-token facts the rest of slmforge needs."""

    def __init__(self, tok: HFTokenizer, bos: str | None = BOS, eos: str | None = EOS, pad: str | None = PAD,
                 chat_template: str | None = CHAT_TEMPLATE, stop_tokens: Iterable[str] = (END_OF_TURN,)):
        self.tok = tok
        self.bos, self.eos, self.pad, self.chat_template = bos, eos, pad, chat_template
        self.bos_id = tok.token_to_id(bos) if bos else None
        self.eos_id = tok.token_to_id(eos) if eos else None
        self.pad_id = tok.token_to_id(pad) if pad else None
        # Ids that end a generated reply: eos, and the end-of-turn token when the vocab has one.
        self.stop_ids = [i for i in [self.eos_id, *(tok.token_to_id(t) for t in stop_tokens)] if i is not None]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def encode_with_offsets(self, text: str, bos: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character span in text (bos gets (0, 0)). A byte-level
        token holding part of a multi-byte character spans that whole character."""
        enc = self.tok.encode(text, add_special_tokens=False)
        ids, offsets = list(enc.ids), [tuple(o) for o in enc.offsets]
        if bos and self.bos_id is not None:
            ids, offsets = [self.bos_id, *ids], [(0, 0), *offsets]
        return ids, offsets

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        out = [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        pre = [self.bos_id] if bos and self.bos_id is not None else []
        post = [self.eos_id] if eos and self.eos_id is not None else []
        return [pre + ids + post for ids in out] if (pre or post) else out

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise SlmforgeError("this tokenizer has no chat template (a plain language model): use generate")
        import jinja2

        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise SlmforgeError(f"messages[{i}]: need 'role' and 'content'")
        env = jinja2.Environment(keep_trailing_newline=True)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos or "",
            eos_token=self.eos or "")

    def bytes_per_token(self, texts: Iterable[str]) -> float:
        """Compression: UTF-8 bytes per token (higher is better)."""
        texts = list(texts)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tokens = sum(len(ids) for ids in self.encode_batch(texts))
        return n_bytes / max(n_tokens, 1)

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        atomic_write_text(out / "tokenizer.json", self.tok.to_str())
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos, "eos_token": self.eos, "pad_token": self.pad, "unk_token": None,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        atomic_write_text(out / "tokenizer_config.json", json.dumps(cfg, indent=2))
        special = {k: v for k, v in (("bos_token", self.bos), ("eos_token", self.eos), ("pad_token", self.pad)) if v}
        atomic_write_text(out / "special_tokens_map.json", json.dumps(special, indent=2))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise SlmforgeError(f"{tj}: missing (a model directory needs tokenizer.json)")
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise SlmforgeError(f"{tj}: not a valid tokenizer file ({str(e).splitlines()[0]})") from None
        cfg = {}
        tc = path / "tokenizer_config.json"
        if tc.is_file():
            try:
                cfg = json.loads(tc.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SlmforgeError(f"{tc}: invalid JSON ({e})") from None

        def token(key: str) -> str | None:
            v = cfg.get(key)
            return v.get("content") if isinstance(v, dict) else v

        out = cls(tok, bos=token("bos_token"), eos=token("eos_token"), pad=token("pad_token"),
                  chat_template=cfg.get("chat_template"))
        gc = path / "generation_config.json"
        if gc.is_file():  # a model directory: its generation config says which ids end a reply
            try:
                eos = json.loads(gc.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SlmforgeError(f"{gc}: invalid JSON ({e})") from None
            ids = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
            if ids:
                out.stop_ids = [int(i) for i in ids]
        return out


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenisation) with slmforge's special tokens."""
    if vocab_size < MIN_VOCAB:
        raise SlmforgeError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB} "
                            f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes)")
    if vocab_size > 65535 * 65536:
        raise SlmforgeError(f"vocab size {vocab_size} is too large")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Like Llama, `add_special_tokens=True` (transformers' default) prepends <s>; slmforge's own encode
    # passes False and adds bos explicitly, so both agree on the ids a model was trained on.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))]),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )
    seen = [0]

    def counted(it: Iterable[str]) -> Iterator[str]:
        for t in it:
            if t:
                seen[0] += 1
                yield t

    tok.train_from_iterator(counted(texts), trainer=trainer)
    if seen[0] == 0:
        raise SlmforgeError("tokenizer training: the corpus is empty (no non-empty documents)")
    return Tokenizer(tok)
