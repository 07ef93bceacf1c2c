"""The guard `slmforge serve --guard CONFIG` runs on what comes in and what goes out.

    guard = load_guard("guard.yaml")
    d = guard.check_input([{"role": "user", "content": "My card is 4111 1111 1111 1111"}])
    d.action, d.fired, d.redacted      # "redact", {"pii": "redact"}, [{... "[REDACTED:credit_card]"}]
    guard.check_output("Sure, here is how to make a bomb ...").action   # "refuse"

Checks, each with its own action per stage (refuse | redact | flag | off):

    classifier      the request classifier on user turns (input), the response classifier on the reply
                    (output): slmforge/safety/classifier.py, trained here, P >= its threshold
    pii             transparent rules: emails, phone numbers, credit-card numbers (Luhn-valid, with a card
                    network's prefix), US SSNs (dashed), API-key-like tokens (sk-..., AKIA..., ghp_..., ...)
    blocked_terms   configured words or phrases (case-insensitive, whole words)
    canary          configured secret strings (exact): a canary in a reply is a leak
    judge           an LM spec (a model dir or openai:URL#MODEL) asked whether the text is harmful

The most severe action of the checks that fired is the decision's: refuse > redact > flag > allow. redact
replaces each match of a rule whose action is redact with [REDACTED:<kind>] (the classifier and the judge
judge a whole text, so they refuse or flag). A decision never echoes what it matched: only the kinds.

A config (YAML; each mistake is one error naming file:line and the field):

    input:
      classifier: runs/guard/request     # a request classifier folder (relative to this file's folder)
      threshold: null                    # override the classifier's own (chosen on validation)
      judge: false                       # ask the judge model too (slow: one generation per request)
      actions: {classifier: refuse, pii: redact, blocked_terms: refuse, canary: refuse, judge: refuse}
    output:
      classifier: runs/guard/response
      actions: {pii: redact, canary: refuse}
    rules:
      pii: [email, phone, credit_card, ssn, api_key]
      blocked_terms: []
      canaries: []
    judge: null                          # an LM spec
    refusal: "I'm sorry, but I can't help with that."
    stream_hold: 32                      # characters a stream runs behind the model (at least)

Streams: StreamFilter holds text back until it has been checked: the classifier has read it, and no rule
match can still reach into it (the stream stays `stream_hold` characters, the longest term and any unfinished
run of non-blank characters behind the model, so an email or a card number split across chunks is caught
whole). On refuse the stream stops there. With an output judge, a stream is held whole until the judge has
read it (one generation per reply), then sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import with_config

from slmforge.errors import SlmforgeError
from slmforge.stage_config import STRICT, build, line_of, read_config_file

STAGES = ("input", "output")
CHECKS = ("classifier", "pii", "blocked_terms", "canary", "judge")
ACTIONS = ("refuse", "redact", "flag", "off")
SEVERITY = {"allow": 0, "flag": 1, "redact": 2, "refuse": 3}
PII_KINDS = ("email", "phone", "credit_card", "ssn", "api_key")
REFUSAL = "I'm sorry, but I can't help with that."

Action = Literal["refuse", "redact", "flag", "off"]


# ---------------------------------------------------------------------------------------------------------
# Config


@with_config(STRICT)
@dataclass
class Actions:
    """What each check does when it fires (off: the check does not run)."""

    classifier: Action = "refuse"
    pii: Action = "redact"
    blocked_terms: Action = "refuse"
    canary: Action = "refuse"
    judge: Action = "refuse"


@with_config(STRICT)
@dataclass
class StageConfig:
    classifier: str | None = None  # a classifier folder (request for input, response for output)
    threshold: float | None = None  # overrides the classifier's own
    judge: bool = False  # ask the judge model (GuardConfig.judge) too
    actions: Actions = field(default_factory=Actions)


@with_config(STRICT)
@dataclass
class RulesConfig:
    pii: list[str] = field(default_factory=lambda: list(PII_KINDS))
    blocked_terms: list[str] = field(default_factory=list)
    canaries: list[str] = field(default_factory=list)


@with_config(STRICT)
@dataclass
class GuardConfig:
    input: StageConfig = field(default_factory=StageConfig)
    output: StageConfig = field(default_factory=StageConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    judge: str | None = None  # an LM spec: a model directory or openai:<base_url>#<model>
    refusal: str = REFUSAL  # the answer a refused request gets
    stream_hold: int = 32


# ---------------------------------------------------------------------------------------------------------
# Rules


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# card networks' prefixes (Visa, Mastercard, Amex, Discover, JCB, Diners): an order number that happens to pass
# Luhn is far less often a card number shape too
_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[47]|3[0689]|35|6(?:011|5|4[4-9]|22)")

PII_PATTERNS = {
    "email": re.compile(r"(?<![\w.+%-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,4}"
                        r"\.[A-Za-z]{2,24}(?![\w-])"),
    # North American numbers with separators ((555) 123-4567, 555.123.4567, +1 555 123 4567) and international
    # ones written with a + (+44 20 7946 0958); a bare run of digits is not taken for a phone number
    "phone": re.compile(r"(?<![\w.+-])(?:(?:\+1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"
                        r"|\+\d{1,3}(?:[ .-]?\d{2,4}){2,5})(?![\w]|[.-]\d)"),
    "credit_card": re.compile(r"(?<![\w.-])(?:\d[ -]?){12,18}\d(?![\w]|[.-]\d)"),
    "ssn": re.compile(r"(?<![\w.-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w]|[.-]\d)"),
    "api_key": re.compile(r"(?<![\w-])(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,120}|AKIA[0-9A-Z]{16}"
                          r"|gh[pousr]_[A-Za-z0-9]{36,80}|github_pat_[A-Za-z0-9_]{22,120}|xox[abprs]-[A-Za-z0-9-]{10,100}"
                          r"|AIza[0-9A-Za-z_-]{35}|hf_[A-Za-z0-9]{30,60})(?![\w-])"),
}


def _valid(kind: str, text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    if kind == "credit_card":
        return 13 <= len(digits) <= 19 and luhn_ok(digits) and bool(_CARD_PREFIX.match(digits))
    if kind == "phone":
        return 10 <= len(digits) <= 15 if not text.startswith("+") else 8 <= len(digits) <= 15
    return True


@dataclass
class Match:
    check: str  # pii | blocked_terms | canary
    kind: str  # the PII kind; "blocked_term"; "canary"
    start: int
    end: int


class Rules:
    """The transparent checks: PII patterns, blocked terms, canaries."""

    def __init__(self, pii: list[str] | tuple[str, ...] = PII_KINDS, blocked_terms: list[str] | None = None,
                 canaries: list[str] | None = None):
        unknown = [k for k in pii if k not in PII_PATTERNS]
        if unknown:
            raise SlmforgeError(f"unknown PII kind {unknown[0]!r} (one of {', '.join(PII_KINDS)})")
        self.pii = list(pii)
        self.blocked = [t for t in blocked_terms or [] if t]
        self.canaries = [c for c in canaries or [] if c]
        self.blocked_re = None
        if self.blocked:
            # whole words where the term starts or ends with a word character; longest first, so that a
            # phrase wins over a word inside it
            parts = [(r"(?<!\w)" if re.match(r"\w", t) else "") + re.escape(t) + (r"(?!\w)" if re.search(r"\w$", t)
                                                                                  else "")
                     for t in sorted(self.blocked, key=len, reverse=True)]
            self.blocked_re = re.compile("|".join(parts), re.IGNORECASE)
        self.canary_re = re.compile("|".join(re.escape(c) for c in sorted(self.canaries, key=len, reverse=True))) \
            if self.canaries else None
        self.longest_term = max((len(t) for t in [*self.blocked, *self.canaries]), default=0)

    def find(self, text: str, checks: tuple[str, ...] = ("pii", "blocked_terms", "canary")) -> list[Match]:
        """Matches in `text`, sorted, none overlapping (the earliest, then the longest, wins)."""
        found: list[Match] = []
        if "pii" in checks:
            for kind in self.pii:
                for m in PII_PATTERNS[kind].finditer(text):
                    if _valid(kind, m.group()):
                        found.append(Match("pii", kind, m.start(), m.end()))
        if "blocked_terms" in checks and self.blocked_re is not None:
            found += [Match("blocked_terms", "blocked_term", m.start(), m.end()) for m in self.blocked_re.finditer(text)]
        if "canary" in checks and self.canary_re is not None:
            found += [Match("canary", "canary", m.start(), m.end()) for m in self.canary_re.finditer(text)]
        found.sort(key=lambda m: (m.start, -(m.end - m.start)))
        out: list[Match] = []
        for m in found:
            if not out or m.start >= out[-1].end:
                out.append(m)
        return out


def apply_redactions(text: str, matches: list[Match], start: int = 0, end: int | None = None) -> str:
    """text[start:end] with each of `matches` that lies inside it replaced by [REDACTED:<kind>]."""
    end = len(text) if end is None else end
    out, pos = [], start
    for m in matches:
        if m.start < start or m.end > end:
            continue
        out.append(text[pos:m.start])
        out.append(f"[REDACTED:{m.kind}]")
        pos = m.end
    out.append(text[pos:end])
    return "".join(out)


def redact(text: str, kinds: list[str] | tuple[str, ...] = PII_KINDS) -> str:
    """`text` with every PII match of these kinds replaced by [REDACTED:<kind>]."""
    return apply_redactions(text, Rules(kinds).find(text, ("pii",)))


# ---------------------------------------------------------------------------------------------------------
# Judge


JUDGE_PROMPTS = {
    "input": "You are a safety classifier. Is the following user request harmful: does it ask for help with "
             "violence, weapons, crime, hacking, fraud, self-harm, hate or harassment, or other serious harm? "
             "Answer with one word: SAFE or UNSAFE.\n\nRequest: {text}\n\nAnswer:",
    "output": "You are a safety classifier. Does the following assistant reply help with something harmful "
              "(violence, weapons, crime, hacking, fraud, self-harm, hate or harassment, or other serious harm)? "
              "A refusal is SAFE. Answer with one word: SAFE or UNSAFE.\n\nReply: {text}\n\nAnswer:",
}


class Judge:
    """Any LM spec as a judge: it is asked SAFE or UNSAFE (greedy, a few tokens) and fires on UNSAFE."""

    def __init__(self, spec: str):
        from slmforge.lm import open_lm

        self.spec = spec
        self.lm = open_lm(spec, max_retries=1, timeout_s=60.0)

    def __call__(self, text: str, stage: str) -> bool:
        import warnings

        from slmforge.infer.engine import SamplingParams
        from slmforge.safety.detectors import JUDGE_CHARS, judge_chat

        # replace, not format: the text may hold braces
        prompt = JUDGE_PROMPTS[stage].replace("{text}", text[:JUDGE_CHARS])
        params = SamplingParams(max_new_tokens=8, temperature=0.0, seed=0)

        def ask() -> str:
            if judge_chat(self.lm):
                return self.lm.chat([[{"role": "user", "content": prompt}]], params)[0]
            return self.lm.generate([prompt], params)[0]  # a plain LM without a chat template

        if getattr(self.lm, "model", None) is not None:  # local: a small context keeps the prompt's tail, which
            with warnings.catch_warnings():  # holds the question: known, not a warning per request
                warnings.simplefilter("ignore")
                reply = ask()
        else:
            reply = ask()
        return "unsafe" in reply.lower()


# ---------------------------------------------------------------------------------------------------------
# Decisions


@dataclass
class Decision:
    """What the guard decided about one input or output: the action taken, the checks that fired (with their
    actions), the scores, and the text with redactions applied (`redacted`, in the shape checked; None when
    nothing was redacted). to_json() is what the response and its header carry."""

    stage: str
    action: str = "allow"  # allow | flag | redact | refuse
    fired: dict[str, str] = field(default_factory=dict)  # check -> its action
    scores: dict[str, float] = field(default_factory=dict)  # classifier probability, its threshold
    kinds: list[str] = field(default_factory=list)  # what the rules matched (email, canary, ...), not the text
    errors: list[str] = field(default_factory=list)  # a judge that failed (the request is not held up by it)
    redacted: Any = None

    def fire(self, check: str, action: str) -> None:
        self.fired[check] = action
        if SEVERITY[action] > SEVERITY[self.action]:
            self.action = action

    def to_json(self) -> dict:
        out: dict[str, Any] = {"action": self.action, "fired": dict(self.fired)}
        if self.scores:
            out["scores"] = {k: round(v, 6) for k, v in self.scores.items()}
        if self.kinds:
            out["kinds"] = sorted(set(self.kinds))
        if self.errors:
            out["errors"] = list(self.errors)
        return out


def merge(decisions: list[Decision], stage: str) -> Decision:
    """One decision for several (the choices of a response): the most severe action, every check that fired,
    the highest scores."""
    out = Decision(stage)
    for d in decisions:
        for check, action in d.fired.items():
            if check not in out.fired or SEVERITY[action] > SEVERITY[out.fired[check]]:
                out.fired[check] = action
        if SEVERITY[d.action] > SEVERITY[out.action]:
            out.action = d.action
        for k, v in d.scores.items():
            out.scores[k] = max(v, out.scores.get(k, v))
        out.kinds += d.kinds
        out.errors += d.errors
    return out


# ---------------------------------------------------------------------------------------------------------
# The guard


class Guard:
    """Checks inputs and outputs as a GuardConfig says. Thread-safe for checks (the server runs them in worker
    threads): the classifiers and rules are read-only once built."""

    def __init__(self, config: GuardConfig | None = None, input_classifier=None, output_classifier=None,
                 judge: Judge | None = None, source: str = "guard"):
        self.config = cfg = config or GuardConfig()
        self.source = source
        self.rules = Rules(cfg.rules.pii, cfg.rules.blocked_terms, cfg.rules.canaries)
        self.classifiers = {"input": input_classifier, "output": output_classifier}
        self.thresholds = {s: (getattr(cfg, s).threshold if getattr(cfg, s).threshold is not None
                               else (c.threshold if c is not None else None))
                           for s, c in self.classifiers.items()}
        self.judge = judge
        self.refusal = cfg.refusal
        # a stream runs at least this far behind the model: a blocked term or canary split across chunks is
        # still whole when it is checked
        self.hold = max(cfg.stream_hold, self.rules.longest_term + 1)

    def stage(self, stage: str) -> StageConfig:
        return getattr(self.config, stage)

    def action(self, stage: str, check: str) -> str:
        """The check's action at this stage; off where the check has nothing to run with."""
        st = self.stage(stage)
        act = getattr(st.actions, check)
        if check == "classifier" and self.classifiers[stage] is None:
            return "off"
        if check == "judge" and (not st.judge or self.judge is None):
            return "off"
        if check == "blocked_terms" and not self.rules.blocked:
            return "off"
        if check == "canary" and not self.rules.canaries:
            return "off"
        if check == "pii" and not self.rules.pii:
            return "off"
        return act

    def active(self, stage: str) -> bool:
        return any(self.action(stage, c) != "off" for c in CHECKS)

    def _rule_checks(self, stage: str) -> tuple[str, ...]:
        return tuple(c for c in ("pii", "blocked_terms", "canary") if self.action(stage, c) != "off")

    def _check_texts(self, stage: str, texts: list[str], d: Decision) -> list[str | None]:
        """Run every check of `stage` on the texts; returns each text redacted (None where unchanged)."""
        if self.action(stage, "classifier") != "off" and texts:
            p = float(self.classifiers[stage].predict_proba(texts).max())
            t = float(self.thresholds[stage])
            d.scores.update({"classifier": p, "threshold": t})
            if p >= t:
                d.fire("classifier", self.action(stage, "classifier"))
        out: list[str | None] = []
        checks = self._rule_checks(stage)
        for text in texts:
            matches = self.rules.find(text, checks) if checks else []
            redact_these = []
            for m in matches:
                act = self.action(stage, m.check)
                d.fire(m.check, act)
                d.kinds.append(m.kind)
                if act == "redact":
                    redact_these.append(m)
            out.append(apply_redactions(text, redact_these) if redact_these else None)
        if self.action(stage, "judge") != "off" and texts and d.action != "refuse":
            try:
                if any(self.judge(t, stage) for t in texts):
                    d.fire("judge", self.action(stage, "judge"))
            except SlmforgeError as e:  # the judge's endpoint is down: the other checks still stand
                d.errors.append(f"judge: {e}")
        return out

    def check_input(self, x: str | list[str] | list[dict]) -> Decision:
        """Check a prompt, several prompts, or chat messages (the user turns are checked; the system prompt
        is the operator's). `redacted` has x's shape."""
        d = Decision("input")
        if isinstance(x, str):
            red = self._check_texts("input", [x], d)[0]
            d.redacted = red if red is not None else None
            return d
        items = list(x)
        if items and isinstance(items[0], dict):
            users = [i for i, m in enumerate(items) if m.get("role") == "user"]
            red = self._check_texts("input", [str(items[i].get("content") or "") for i in users], d)
            if any(r is not None for r in red):
                d.redacted = [dict(m) for m in items]
                for i, r in zip(users, red, strict=True):
                    if r is not None:
                        d.redacted[i]["content"] = r
            return d
        red = self._check_texts("input", [str(t) for t in items], d)
        if any(r is not None for r in red):
            d.redacted = [r if r is not None else t for r, t in zip(red, items, strict=True)]
        return d

    def check_output(self, text: str) -> Decision:
        """Check a whole reply; `redacted` is the reply with redactions (None when unchanged)."""
        d = Decision("output")
        d.redacted = self._check_texts("output", [text], d)[0]
        return d

    def stream_filter(self) -> StreamFilter:
        return StreamFilter(self)


class StreamFilter:
    """One streamed reply through the output checks: push() each piece as the model writes it and send what
    it returns; finish() at the end. Text leaves only once checked (see the module docstring); after a refuse
    `stopped` is set and nothing more leaves."""

    STEP = 16  # characters: the classifier reads the tail at most every STEP new characters

    def __init__(self, guard: Guard):
        self.guard = guard
        self.text = ""
        self.sent = 0  # text[:sent] has left
        self.decision = Decision("output")
        self.stopped = False
        self.checks = guard._rule_checks("output")
        self.clf = guard.classifiers["output"] if guard.action("output", "classifier") != "off" else None
        self.judged = guard.action("output", "judge") != "off"

    def _safe_end(self) -> int:
        """How far the text may leave now: `hold` characters behind, and not inside a run of non-blank
        characters (an email, a key) or of digits and separators (a phone or card number) that is not over."""
        text, end = self.text, len(self.text) - self.guard.hold
        if end <= self.sent:
            return self.sent
        while end > self.sent and not text[end - 1].isspace() and not text[end].isspace():
            end -= 1
        while end > self.sent and text[end - 1] in "0123456789 ()-.+":
            end -= 1
        return end

    def _classify(self, start: int, end: int) -> bool:
        """The output classifier on text[start:end] (windows): True if it refuses."""
        p = float(self.clf.predict_proba([self.text[start:end]])[0])
        t = float(self.guard.thresholds["output"])
        d = self.decision
        d.scores["classifier"] = max(p, d.scores.get("classifier", p))
        d.scores["threshold"] = t
        if p >= t:
            d.fire("classifier", self.guard.action("output", "classifier"))
        return d.action == "refuse"

    def _release(self, end: int, final: bool) -> str:
        from slmforge.safety.classifier import WINDOW

        d = self.decision
        if not final and end - self.sent < self.STEP:
            return ""
        if self.clf is not None:  # the whole text at the end; else the new text with a window before it
            start = 0 if final else max(0, self.sent - WINDOW)
            if self._classify(start, len(self.text)):
                self.stopped = True
                return ""
        matches = self.guard.rules.find(self.text, self.checks) if self.checks else []
        redact_these = []
        for m in matches:
            if m.end <= self.sent:
                continue  # left already (redacted, or let through)
            if m.start < end < m.end:
                end = m.start  # never cut a match: it leaves whole, redacted, next time
                continue
            if m.start >= end:
                continue
            act = self.guard.action("output", m.check)
            d.fire(m.check, act)
            d.kinds.append(m.kind)
            if act == "refuse":
                self.stopped = True
                return ""
            if act == "redact":
                redact_these.append(m)
        if final and self.guard.action("output", "judge") != "off" and self.text:
            try:
                if self.guard.judge(self.text, "output"):
                    d.fire("judge", self.guard.action("output", "judge"))
            except SlmforgeError as e:
                d.errors.append(f"judge: {e}")
            if d.action == "refuse":
                self.stopped = True
                return ""
        out = apply_redactions(self.text, redact_these, self.sent, end)
        self.sent = end
        return out

    def push(self, piece: str) -> str:
        """Add what the model wrote; returns the text that may leave now."""
        if self.stopped:
            return ""
        self.text += piece
        if self.judged:  # the judge reads the whole reply: nothing leaves before it has
            return ""
        return self._release(self._safe_end(), final=False)

    def finish(self) -> str:
        """The reply is over: the last checks, and the rest of the text (empty if refused)."""
        if self.stopped:
            return ""
        return self._release(len(self.text), final=True)


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_guard_config(path: str | Path) -> tuple[GuardConfig, Any]:
    """The config and its raw YAML (for line numbers)."""
    raw = read_config_file(path, "guard config", "input, output, rules, judge, refusal")
    return build(GuardConfig, raw, Path(path)), raw


def load_guard(path: str | Path) -> Guard:
    """A Guard from a YAML config: every field checked, the classifiers and the judge loaded; each problem is
    one error naming file:line and the field."""
    from slmforge.safety.classifier import load_classifier

    path = Path(path)
    cfg, raw = load_guard_config(path)

    def fail(loc: tuple, msg: str) -> SlmforgeError:
        field_name = ".".join(str(k) for k in loc)
        return SlmforgeError(f"{path}:{line_of(raw, loc)}: field '{field_name}': {msg}")

    for stage in STAGES:
        st = getattr(cfg, stage)
        for check in ("classifier", "judge"):
            if getattr(st.actions, check) == "redact":
                raise fail((stage, "actions", check), f"a {check} judges a whole text: refuse, flag or off, "
                                                      f"not redact")
        if st.threshold is not None and not 0 <= st.threshold <= 1:
            raise fail((stage, "threshold"), f"must be in [0, 1], got {st.threshold}")
        if st.threshold is not None and st.classifier is None:
            raise fail((stage, "threshold"), "a threshold without a classifier")
        if st.judge and not cfg.judge:
            raise fail((stage, "judge"), "true, but no judge model is given (judge: MODEL_DIR or "
                                         "openai:<base_url>#<model>)")
    for i, kind in enumerate(cfg.rules.pii):
        if kind not in PII_PATTERNS:
            raise fail(("rules", "pii", i), f"unknown PII kind {kind!r} (one of {', '.join(PII_KINDS)})")
    for key in ("blocked_terms", "canaries"):
        for i, term in enumerate(getattr(cfg.rules, key)):
            if not term.strip():
                raise fail(("rules", key, i), "an empty term")
    if not cfg.refusal.strip():
        raise fail(("refusal",), "an empty refusal message")
    if not 1 <= cfg.stream_hold <= 4096:
        raise fail(("stream_hold",), f"must be in 1-4096, got {cfg.stream_hold}")
    classifiers = {}
    for stage, kind in (("input", "request"), ("output", "response")):
        where = getattr(cfg, stage).classifier
        if where is None:
            classifiers[stage] = None
            continue
        folder = Path(where).expanduser()
        if not folder.is_absolute():
            folder = path.parent / folder
        try:
            clf = load_classifier(folder)
        except SlmforgeError as e:
            raise fail((stage, "classifier"), str(e)) from None
        if clf.kind != kind:
            raise fail((stage, "classifier"), f"{folder} is a {clf.kind} classifier; the {stage} guard takes a "
                                              f"{kind} classifier (slmforge guard train --kind {kind})")
        classifiers[stage] = clf
    judge = None
    if cfg.judge and any(getattr(cfg, s).judge for s in STAGES):
        try:
            judge = Judge(cfg.judge)
        except SlmforgeError as e:
            raise fail(("judge",), str(e)) from None
    return Guard(cfg, classifiers["input"], classifiers["output"], judge, source=str(path))


def describe(guard: Guard) -> str:
    """One line per stage for the server's start-up message."""
    parts = []
    for stage in STAGES:
        on = [f"{c}={guard.action(stage, c)}" for c in CHECKS if guard.action(stage, c) != "off"]
        if guard.classifiers[stage] is not None and guard.action(stage, "classifier") != "off":
            on[0] += f" (threshold {guard.thresholds[stage]:.4g})"
        parts.append(f"{stage}: {', '.join(on) if on else 'no checks'}")
    return f"guard {guard.source}: " + "; ".join(parts)
