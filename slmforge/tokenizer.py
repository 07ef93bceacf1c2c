"""Tokenizer: byte-level BPE trained with HF `tokenizers`, special tokens, and a chat template.

On disk it is what transformers expects: tokenizer.json + tokenizer_config.json (with chat_template),
so `AutoTokenizer.from_pretrained(model_dir)` gives the same ids as `Tokenizer.from_dir(model_dir)`.

Control tokens (<s>, </s>, <|user|>, ...) come only from the chat template's own markup: `encode` treats
every string it is given as plain text, so a `</s>` in a story or a `<|assistant|>` typed by a user is
encoded as the characters it is. A conversation goes through `apply_chat_template`, whose result (a
`ChatText`) remembers which control tokens the user typed, and `encode` of that gives the template's
markers as their ids: the same ids as transformers' `apply_chat_template(..., sanitize_control_tokens=True)`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from slmforge.errors import SlmforgeError
from slmforge.io import atomic_write_text, read_json

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

# Private-use characters that wrap a control token the user typed, as transformers' mark_control_tokens does.
MARK_START, MARK_END = "\U000f0000", "\U000f0001"
Messages = list[dict]


# ------------------------------------------------------------------------------------ chat templates
# Rendered exactly as transformers' apply_chat_template renders them (utils/chat_template_utils.py:
# _compile_jinja_template): a sandbox, since a template from the hub is untrusted code; trim_blocks and
# lstrip_blocks, which most templates are written for; and the same globals and filters.


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to find assistant tokens; we render the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _TemplateNamespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore names, which could reach CPython internals (as transformers')."""

    def __init__(*args, **kwargs):  # jinja's own signature trick, so that namespace(self=...) still works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters; templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _template_dict(*args, **kwargs) -> dict:
    # dict() for templates, without the type itself (and its attributes) inside the sandbox
    return dict(*args, **kwargs)


_template_dict.fromkeys = dict.fromkeys


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """The compiled template, built once per template string (rendering is then cheap)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, namespace=_TemplateNamespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt), dict=_template_dict)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise SlmforgeError(f"chat template: {e}") from None


def _mark(obj, control: re.Pattern):
    """Wrap each control token inside the user's strings (values, not keys) in MARK_START/MARK_END."""
    if isinstance(obj, str):  # markers the user typed would forge a marked token: drop them first
        obj = obj.replace(MARK_START, "").replace(MARK_END, "")
        return control.sub(lambda m: MARK_START + m.group(0) + MARK_END, obj)
    if isinstance(obj, dict):
        return {k: _mark(v, control) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_mark(v, control) for v in obj]
    return obj


def _alternation(tokens: Iterable[str]) -> str:
    """A regex matching any of tokens, longest first (so a token wins over the tokens it contains)."""
    return "|".join(map(re.escape, sorted(set(tokens), key=len, reverse=True))) or "(?!)"  # (?!) never matches


@lru_cache(maxsize=32)
def _regex(pattern: str) -> re.Pattern:
    return re.compile(pattern)


class ChatText(str):
    """A rendered conversation. As a str it is exactly what transformers renders; `marked` is the same
    render with the control tokens that came from the user wrapped in MARK_START/MARK_END, so that
    `Tokenizer.encode` can tell them from the template's own. Slicing or concatenating gives a plain str
    (plain text): slice `marked` and rebuild with `chat_text` instead."""

    marked: str

    def __new__(cls, text: str, marked: str | None = None) -> ChatText:
        out = super().__new__(cls, text)
        out.marked = text if marked is None else marked
        return out


def chat_text(marked: str) -> ChatText:
    """A ChatText from a (piece of a) marked render."""
    return ChatText(marked.replace(MARK_START, "").replace(MARK_END, ""), marked)


class Tokenizer:
    """A tokenizers.Tokenizer plus the special-token facts the rest of slmforge needs."""

    template_source = "chat template"  # where the template came from, for its errors (from_dir: the file)

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

    @cached_property
    def _plain(self) -> HFTokenizer:
        """A copy of the tokenizer that reads special-token strings as text (`encode_special_tokens`)."""
        plain = HFTokenizer.from_str(self.tok.to_str())
        plain.encode_special_tokens = True
        return plain

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of text, read as plain text: a special-token string in it (`</s>`) is encoded as characters.
        A ChatText (from apply_chat_template) gets its template's control tokens as their ids."""
        if isinstance(text, ChatText):
            ids = self._encode_marked(text.marked)
        else:
            ids = self._plain.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def encode_with_offsets(self, text: str, bos: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of plain text and each token's (start, end) character span in text (bos gets (0, 0)).
        A byte-level token holding part of a multi-byte character spans that whole character."""
        enc = self._plain.encode(text, add_special_tokens=False)
        ids, offsets = list(enc.ids), [tuple(o) for o in enc.offsets]
        if bos and self.bos_id is not None:
            ids, offsets = [self.bos_id, *ids], [(0, 0), *offsets]
        return ids, offsets

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """encode() of each text; plain texts are encoded in parallel by `tokenizers`."""
        if any(isinstance(t, ChatText) for t in texts):
            return [self.encode(t, bos=bos, eos=eos) for t in texts]
        out = [e.ids for e in self._plain.encode_batch(texts, add_special_tokens=False)]
        pre = [self.bos_id] if bos and self.bos_id is not None else []
        post = [self.eos_id] if eos and self.eos_id is not None else []
        return [pre + ids + post for ids in out] if (pre or post) else out

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def decode_stream(self, skip_special: bool = True) -> StreamDecoder:
        """An incremental decoder for generated ids: `.step(id)` returns the new text (None while a
        character is still incomplete), in constant time per token instead of re-decoding them all."""
        return StreamDecoder(self.tok, skip_special)

    # ---------------------------------------------------------------------------------------- chat

    @cached_property
    def _added(self) -> dict[str, int]:
        return {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}

    def _control_tokens(self, template: str) -> re.Pattern:
        """What counts as a control token in user text, as transformers decides: every special token, and the
        other added tokens the template writes (its raw text stands in for its literals)."""
        tokens = [t.content for t in self.tok.get_added_tokens_decoder().values()
                  if t.special or (t.content in template and not t.content.isspace())]
        return _regex(_alternation(tokens))

    @cached_property
    def _marked_re(self) -> re.Pattern:
        # [text, marked token, text, ...] when split; a lone marker (a template that cut a marked token with
        # split() or a slice) splits with None in the token's place and is dropped
        return re.compile(f"{MARK_START}({_alternation(self._added)}){MARK_END}|[{MARK_START}{MARK_END}]")

    def _encode_marked(self, marked: str) -> list[int]:
        """Ids of a marked render (transformers' encode_marked_chat): the pieces between the user's control
        tokens are encoded with special tokens matched (the template's markup), the user's tokens as text."""
        pieces = self._marked_re.split(marked)
        ids = self.tok.encode(pieces[0], add_special_tokens=False).ids
        newline = self.tok.encode("\n", add_special_tokens=False).ids
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = i % 2 == 1
            enc = self._plain if as_text else self.tok
            # encoded after a newline, so a SentencePiece-style tokenizer adds no prefix space mid-text
            piece_ids = enc.encode("\n" + piece, add_special_tokens=False).ids
            if piece_ids[:len(newline)] == newline:
                piece_ids = piece_ids[len(newline):]
            else:
                piece_ids = enc.encode(piece, add_special_tokens=False).ids
            if as_text and self._added.get(piece) in piece_ids:
                raise SlmforgeError(f"cannot keep {piece!r} as text: this tokenizer encodes that text as the token")
            ids += piece_ids
        return ids

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> ChatText:
        """The conversation rendered by the chat template, exactly as transformers' apply_chat_template(
        messages, tokenize=False) renders it. `encode` of the result keeps user text as text."""
        if not self.chat_template:
            raise SlmforgeError("this tokenizer has no chat template (a plain language model): use generate")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise SlmforgeError(f"messages[{i}]: need 'role' and 'content'")
        try:
            template = compile_chat_template(self.chat_template)
        except SlmforgeError as e:
            if self.template_source == "chat template":
                raise
            raise SlmforgeError(f"{self.template_source}: {e}") from None
        # as transformers: keys whose value is None are left out (templates test for missing keys)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        special = {k: v for k, v in (("bos_token", self.bos), ("eos_token", self.eos), ("pad_token", self.pad)) if v}

        def render(msgs: Messages) -> str:
            try:
                return template.render(messages=msgs, add_generation_prompt=add_generation_prompt, **special)
            except Exception as e:  # a template is code from the model's author: any failure is the template's
                kind = "" if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: "
                where = "" if self.template_source == "chat template" else f"{self.template_source}: "
                raise SlmforgeError(f"{where}chat template: {kind}{e}") from None

        marked_msgs = _mark(messages, self._control_tokens(self.chat_template))
        text = render(messages)
        return ChatText(text, text if marked_msgs == messages else render(marked_msgs))

    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids of a conversation: the template's control tokens as ids, everything the user wrote as text."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

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
            raise SlmforgeError(f"{tj}: not a valid tokenizer file ({_first_line(e)})") from None
        tc = path / "tokenizer_config.json"
        cfg = read_json(tc) if tc.is_file() else {}
        if not isinstance(cfg, dict):
            raise SlmforgeError(f"{tc}: expected a JSON object")

        def token(key: str) -> str | None:
            v = cfg.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if v is not None and not isinstance(v, str):  # else a TypeError inside tokenizers
                raise SlmforgeError(f"{tc}: {key}: expected a string or null, got {v!r}"[:200])
            return v

        template = cfg.get("chat_template")
        if isinstance(template, list):  # the older hub layout: named templates, "default" is the chat one
            template = next((t.get("template") for t in template if isinstance(t, dict)
                             and t.get("name") == "default"), None)
        if template is not None and not isinstance(template, str):
            raise SlmforgeError(f"{tc}: chat_template: expected a string, got {type(template).__name__}")
        source = tc
        jinja_file = path / "chat_template.jinja"  # where transformers >= 4.50 saves it
        if not template and jinja_file.is_file():
            try:
                template, source = jinja_file.read_text(encoding="utf-8"), jinja_file
            except UnicodeDecodeError as e:
                raise SlmforgeError(f"{jinja_file}: not UTF-8 text (byte {e.start})") from None
        out = cls(tok, bos=token("bos_token"), eos=token("eos_token"), pad=token("pad_token"),
                  chat_template=template or None)
        out.template_source = str(source)
        try:  # tokenizers reads some files it cannot write back and read again (encode's copy does that)
            out._plain.encode("a b\n", add_special_tokens=False)
        except Exception as e:
            raise SlmforgeError(f"{tj}: not a valid tokenizer file ({_first_line(e)})") from None
        gc = path / "generation_config.json"
        if gc.is_file():  # a model directory: its generation config says which ids end a reply
            gen = read_json(gc)
            if not isinstance(gen, dict):
                raise SlmforgeError(f"{gc}: expected a JSON object")
            eos = gen.get("eos_token_id")
            ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise SlmforgeError(f"{gc}: eos_token_id: expected a token id or a list of them, got {eos!r}"[:200])
            if ids:
                out.stop_ids = list(ids)
        return out


def _first_line(e: Exception) -> str:
    """An exception's first line of text (its type's name when it has none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class StreamDecoder:
    """Ids in, text out, one token at a time (tokenizers' DecodeStream, bound to a tokenizer)."""

    def __init__(self, tok: HFTokenizer, skip_special: bool = True):
        self.tok, self.stream = tok, decoders.DecodeStream(skip_special_tokens=skip_special)

    def step(self, token_id: int) -> str | None:
        """The text this id completes; None while it ends inside a multi-byte character."""
        return self.stream.step(self.tok, token_id)


def fit_messages(messages: Messages, tokenizer: Tokenizer, max_tokens: int) -> tuple[Messages, int]:
    """(the conversation cut to at most max_tokens prompt tokens, how many messages were dropped).

    The oldest exchanges go first, each whole (a user turn and the turns after it up to the next user turn),
    so the leading system turn(s) and the template's bos stay and the kept part still starts with a user
    turn. Raises SlmforgeError when even the system turn and the last exchange do not fit."""
    n_head = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
    head, rest = messages[:n_head], messages[n_head:]
    cuts = [0, *(i for i, m in enumerate(rest) if i > 0 and m.get("role") == "user")]
    for cut in cuts:
        kept = head + rest[cut:]
        n = len(tokenizer.encode_chat(kept))
        if n <= max_tokens:
            return kept, cut
    raise SlmforgeError(f"the last message does not fit the model's context: {n} prompt tokens"
                        f"{' with the system turn' if head else ''}, and there is room for {max_tokens}")


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
