"""Phi-1-style "textbook" samples: a topic x audience x style x exercise-type formula, and an offline writer
for the topics whose content can be computed.

"Textbooks Are All You Need" (Gunasekar et al., 2023) asked GPT-3.5 for textbook sections, diversified by
constraining topic and target audience. `sample_textbook_seed` draws that formula for one sample (plus a
writing style and an exercise type), `TextbookSeed.prompt()` spells it out for an LLM teacher, and
`write_section` is the offline teacher for the computable topics (arithmetic, fractions, percentages,
unit conversion, Python expressions): an explanation, worked examples and exercises whose answers are
computed here in code, so they are always right. Other topics need an LLM teacher (`can_write_offline`).

How a section varies:
  audience  sets the difficulty (which operations, how big the numbers) and the register of the
            explanation (a 7-year-old is told "adding is putting groups together", an adult the rule).
  style     friendly / formal / step by step / story-based / question and answer: the opening and
            closing lines, whether the explanation reads as prose or Q&A, how worked examples are laid out.
  exercise  short answer, multiple choice (distractors are the usual mistakes), fill in the blank,
            true or false (half the statements are wrong), word problems.
Every exercise's answer key line ends in a checkable equation ("3/4 + 1/6 = 11/12").
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from slmforge.data.basic_vocab import BOY_NAMES, GIRL_NAMES

COMPUTABLE_TOPICS = ("arithmetic", "fractions", "percentages", "unit conversion", "python expressions")
LM_TOPICS = ("science facts for children", "the water cycle", "the solar system", "how plants grow",
             "basic geometry", "english grammar: nouns and verbs", "basic Python: loops and functions",
             "money and budgeting", "healthy eating", "maps and directions")
TOPICS = COMPUTABLE_TOPICS + LM_TOPICS

# audience -> (difficulty level 0-3, register of the explanation)
AUDIENCES = {
    "young children (ages 6-8)": (0, "child"),
    "primary school students (ages 9-11)": (1, "child"),
    "middle school students": (2, "teen"),
    "high school students": (3, "teen"),
    "adult beginners": (2, "adult"),
}
STYLES = ("friendly and encouraging", "concise and formal", "step by step", "story-based", "question and answer")
EXERCISES = ("short answer", "multiple choice", "fill in the blank", "true or false", "word problems")

PROMPT = (
    "Write a section of a textbook about {topic} for {audience}. Write in a {style} style. Start with a clear "
    "explanation of the idea, then give two worked examples that show every step, then give five {exercise} "
    "exercises followed by an answer key with the correct answers. Use words the audience knows."
)


@dataclass
class TextbookSeed:
    """The textbook formula for one sample: what to write about, for whom, how, and the writer's seed."""

    topic: str
    audience: str
    style: str
    exercise: str
    seed: int

    def prompt(self) -> str:
        return PROMPT.format(topic=self.topic, audience=self.audience, style=self.style, exercise=self.exercise)


def can_write_offline(topic: str) -> bool:
    return topic in COMPUTABLE_TOPICS


def sample_textbook_seed(index: int, seed: int = 0, topics: tuple[str, ...] = COMPUTABLE_TOPICS) -> TextbookSeed:
    """Draw topic, audience, style and exercise type for sample `index` (deterministic per (seed, index))."""
    rng = random.Random(f"textbook-{seed}-{index}")  # str seeds hash with sha512: stable across runs
    return TextbookSeed(rng.choice(topics), rng.choice(list(AUDIENCES)), rng.choice(STYLES),
                        rng.choice(EXERCISES), rng.getrandbits(63))


# --- problems ---------------------------------------------------------------------------------------------------

@dataclass
class Problem:
    question: str      # "What is 37 + 48?"
    blank: str         # "37 + 48 = ____"
    equation: str      # "37 + 48 = 85": what the answer key shows
    answer: str        # "85"
    wrong: list[str]   # plausible wrong answers (the usual mistakes), all different from `answer`
    steps: list[str]   # the worked solution, one step per item
    story: str         # the same problem as a word problem


def _num(x: Fraction | int) -> str:
    """A terminating decimal without trailing zeros: 3500, 3.5, 0.125."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    sign, x = ("-" if x < 0 else ""), abs(x)
    whole, rest = divmod(x.numerator, x.denominator)
    digits = ""
    while rest and len(digits) < 12:
        rest *= 10
        digits += str(rest // x.denominator)
        rest %= x.denominator
    return f"{sign}{whole}.{digits}"


def _terminates(x: Fraction) -> bool:
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _frac(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" or noun.startswith("hour") else "a ") + noun


def _name(rng: random.Random) -> tuple[str, str]:
    """A first name and its pronoun."""
    return (rng.choice(GIRL_NAMES), "she") if rng.random() < 0.5 else (rng.choice(BOY_NAMES), "he")


def _distinct_wrong(answer: str, candidates: list[str]) -> list[str]:
    out: list[str] = []
    for c in candidates:
        if c != answer and c not in out:
            out.append(c)
    return out


_THINGS = ("apples", "marbles", "stickers", "books", "shells", "pencils", "cookies", "stamps", "cards", "beads",
           "toy cars", "flowers", "balloons", "coins", "eggs")


def arithmetic_problem(rng: random.Random, level: int) -> Problem:
    ops = {0: "+-", 1: "+-*/", 2: "*/(", 3: "(n"}[level]
    op = rng.choice(ops)
    name, he = _name(rng)
    things = rng.choice(_THINGS)
    if op in "+-":
        hi = 20 if level == 0 else 1000
        a, b = rng.randint(2, hi), rng.randint(2, hi)
        if op == "-" and b > a:
            a, b = b, a
        v = a + b if op == "+" else a - b
        sym = op if op == "+" else "−"
        expr = f"{a} {sym} {b}"
        if op == "+":
            steps = ([f"Start at {a} and count on {b} more: {v}."] if a < 10 or b < 10 else
                     [f"Add the tens and ones separately: {a - a % 10} + {b - b % 10} = {a - a % 10 + b - b % 10} "
                      f"and {a % 10} + {b % 10} = {a % 10 + b % 10}.",
                      f"Put them together: {a - a % 10 + b - b % 10} + {a % 10 + b % 10} = {v}."])
            story = f"{name} has {a} {things}. Then {he} gets {b} more. How many {things} does {name} have now?"
            wrong = [str(v + 1), str(v - 1), str(v + 10), str(v - 10), str(abs(a - b))]
        else:
            steps = ([f"Start at {a} and count back {b}: {v}."] if b < 10 else
                     [f"Take away the tens first: {a} − {b - b % 10} = {a - b + b % 10}.",
                      f"Then take away the ones: {a - b + b % 10} − {b % 10} = {v}."])
            story = f"{name} had {a} {things} and gave {b} of them away. How many {things} are left?"
            wrong = [str(v + 1), str(v - 1), str(v + 10), str(a + b)]
    elif op in "*/":
        hi = 12 if level == 1 else 40
        a, b = rng.randint(2, hi), rng.randint(2, 12)
        if op == "*":
            v, expr = a * b, f"{a} × {b}"
            steps = [f"{a} × {b} means {b} groups of {a}.",
                     f"{a} × {b} = {a * (b - 1)} + {a} = {v}." if b > 2 else f"{a} + {a} = {v}."]
            story = f"There are {b} boxes with {a} {things} in each box. How many {things} are there in all?"
            wrong = [str(v + a), str(v - a), str(a + b), str(v + 1)]
        else:
            v, a = a, a * b
            expr = f"{a} ÷ {b}"
            steps = [f"Ask: how many groups of {b} make {a}?", f"{b} × {v} = {a}, so {a} ÷ {b} = {v}."]
            story = f"{name} shares {a} {things} equally among {b} friends. How many {things} does each friend get?"
            wrong = [str(v + 1), str(v - 1), str(a - b), str(v * 2)]
    elif op == "(":
        a, b, c = rng.randint(2, 30), rng.randint(2, 12), rng.randint(2, 12)
        v, expr = a + b * c, f"{a} + {b} × {c}"
        steps = [f"Multiply before you add: {b} × {c} = {b * c}.", f"Then add: {a} + {b * c} = {v}."]
        story = (f"{name} has {a} {things} and buys {b} packs with {c} {things} in each pack. "
                 f"How many {things} does {name} have now?")
        wrong = [str((a + b) * c), str(v + 1), str(a + b + c)]
    else:  # parentheses and negative numbers
        a, b, c = rng.randint(-20, 20), rng.randint(2, 15), rng.randint(2, 9)
        v, expr = (a - b) * c, f"({a} − {b}) × {c}"
        steps = [f"Work inside the parentheses first: {a} − {b} = {a - b}.",
                 f"Then multiply: {a - b} × {c} = {v}" + (" (a negative times a positive is negative)." if v < 0
                                                         else ".")]
        story = (f"{name} starts at {a} on a number line and moves {b} steps to the left. Then {he} multiplies "
                 f"the number {he} lands on by {c}. What number does {he} get?")
        wrong = [str(a - b * c), str(-v), str((a + b) * c)]
    return Problem(f"What is {expr}?", f"{expr} = ____", f"{expr} = {v}", str(v),
                   _distinct_wrong(str(v), wrong), steps, story)


def fractions_problem(rng: random.Random, level: int) -> Problem:
    ops = {0: "s", 1: "s+-", 2: "+-", 3: "*÷+-"}[level]
    op = rng.choice(ops)
    name, he = _name(rng)
    if op == "s":  # same denominator addition
        d = rng.choice((3, 4, 5, 6, 8, 10))
        a, b = rng.randint(1, d - 1), rng.randint(1, d - 1)
        x, y, op = Fraction(a, d), Fraction(b, d), "+"
    else:
        x = Fraction(rng.randint(1, 9), rng.choice((2, 3, 4, 5, 6, 8, 10, 12)))
        y = Fraction(rng.randint(1, 9), rng.choice((2, 3, 4, 5, 6, 8, 10, 12)))
        x, y = (max(x, y), min(x, y)) if op == "-" else (x, y)
        if x.denominator == 1 or y.denominator == 1 or x == y:
            x, y = Fraction(1, 2), Fraction(1, 3)
    xs, ys = _frac(x), _frac(y)
    sym = {"+": "+", "-": "−", "*": "×", "÷": "÷"}[op]
    expr = f"{xs} {sym} {ys}"
    if op in "+-":
        v = x + y if op == "+" else x - y
        common = x.denominator * y.denominator // math.gcd(x.denominator, y.denominator)
        nx, ny = x.numerator * common // x.denominator, y.numerator * common // y.denominator
        raw = nx + ny if op == "+" else nx - ny
        steps = ([] if x.denominator == y.denominator else
                 [f"Find a common denominator: {common}. {xs} = {nx}/{common} and {ys} = {ny}/{common}."])
        steps.append(f"{'Add' if op == '+' else 'Subtract'} the numerators and keep the denominator: "
                     f"{nx} {sym} {ny} = {raw}, so we get {raw}/{common}.")
        naive = Fraction(x.numerator + y.numerator, x.denominator + y.denominator) if op == "+" else x
        wrong = [_frac(naive), f"{raw}/{common * 2}", _frac(v + Fraction(1, common))]
        story = (f"{name} ate {xs} of a pizza and {he} then ate {ys} more. How much of the pizza did {name} eat?"
                 if op == "+" else f"{name} had {xs} of a cake and gave {ys} of the whole cake to a friend. "
                 f"How much of the cake does {name} have left?")
    elif op == "*":
        v = x * y
        steps = [f"Multiply the numerators: {x.numerator} × {y.numerator} = {x.numerator * y.numerator}.",
                 f"Multiply the denominators: {x.denominator} × {y.denominator} = {x.denominator * y.denominator}."]
        raw = Fraction(x.numerator * y.numerator, x.denominator * y.denominator)
        wrong = [_frac(Fraction(x.numerator * y.denominator, x.denominator * y.numerator)), _frac(x + y),
                 f"{x.numerator * y.numerator}/{x.denominator + y.denominator}"]
        story = f"{name} has {xs} of a bag of rice and uses {ys} of it. What part of the whole bag does {he} use?"
    else:
        v = x / y
        steps = [f"Dividing by {ys} is the same as multiplying by its reciprocal, {_frac(1 / y)}.",
                 f"{xs} × {_frac(1 / y)} = {x.numerator * y.denominator}/{x.denominator * y.numerator}."]
        wrong = [_frac(x * y), _frac(y / x), _frac(v + 1)]
        story = f"How many pieces of size {ys} fit into {xs}? (Pieces may be cut.)"
    simplified = f"{_frac(v)}" if v.denominator > 1 else str(v.numerator)
    steps.append(f"Simplify: the answer is {simplified}." if v.denominator > 1 or v.numerator else
                 "The answer is 0.")
    if v > 1 and v.denominator > 1:
        steps.append(f"As a mixed number that is {v.numerator // v.denominator} {_frac(v - v.numerator // v.denominator)}.")
    ans = _frac(v)
    return Problem(f"What is {expr}? Give the answer in simplest form.", f"{expr} = ____", f"{expr} = {ans}", ans,
                   _distinct_wrong(ans, wrong), steps, story)


_PERCENTS = {0: (50, 25, 10), 1: (10, 20, 25, 50, 75), 2: (5, 10, 15, 20, 25, 30, 40, 60, 75),
             3: (2, 5, 12, 15, 35, 45, 8, 65, 120)}


def percentages_problem(rng: random.Random, level: int) -> Problem:
    p = rng.choice(_PERCENTS[level])
    kind = rng.choice(("of",) if level == 0 else ("of", "what", "up", "down"))
    if kind == "down" and p >= 100:  # nothing costs less than nothing
        kind = "up"
    x = rng.randint(1, 40) * (4 if level == 0 else 20)
    name, he = _name(rng)
    part = Fraction(p * x, 100)
    if kind == "of":
        v = part
        q, eq = f"What is {p}% of {x}?", f"{p}% of {x} = {_num(v)}"
        steps = [f"{p}% means {p} out of every 100, so {p}% = {p}/100.",
                 f"{p}/100 × {x} = {p * x}/100 = {_num(v)}."]
        if p == 50:
            steps.insert(0, f"50% is one half, so we want half of {x}.")
        story = f"{name} has {x} stickers and gives {p}% of them to a friend. How many stickers does {he} give?"
        wrong = [_num(v * 10), _num(v + 1), _num(v * 2), _num(x - v)]
        ans = _num(v)
    elif kind == "what":
        q, eq = f"What percent of {x} is {_num(part)}?", f"{_num(part)} out of {x} = {p}%"
        steps = [f"Divide the part by the whole: {_num(part)} ÷ {x} = {_num(Fraction(p, 100))}.",
                 f"Multiply by 100 to get a percent: {_num(Fraction(p, 100))} × 100 = {p}%."]
        story = f"{name} answered {_num(part)} of {x} questions on a quiz. What percent of the questions is that?"
        ans = f"{p}%"
        wrong = [f"{p + 5}%", f"{p * 2}%", f"{max(p - 10, 1)}%", f"{_num(part)}%"]
    else:
        v = x + part if kind == "up" else x - part
        word = "increased" if kind == "up" else "decreased"
        q, eq = f"What is {x} {word} by {p}%?", f"{x} {word} by {p}% = {_num(v)}"
        steps = [f"First find {p}% of {x}: {p}/100 × {x} = {_num(part)}.",
                 f"Then {'add' if kind == 'up' else 'subtract'}: {x} {'+' if kind == 'up' else '−'} {_num(part)} "
                 f"= {_num(v)}."]
        story = (f"A bike costs {x} dollars. The price goes up by {p}%. What is the new price in dollars?"
                 if kind == "up" else
                 f"A jacket costs {x} dollars. In a sale it is {p}% off. What does {name} pay for it in dollars?")
        ans = _num(v)
        wrong = [_num(part), _num(x + (part if kind == "down" else -part)), _num(v + 1), _num(x + p)]
    return Problem(q, eq.rsplit(" = ", 1)[0] + " = ____", eq, ans, _distinct_wrong(ans, wrong), steps, story)


UNITS = {  # unit -> size in the category's smallest unit
    "length": {"mm": 1, "cm": 10, "m": 1000, "km": 1_000_000},
    "mass": {"g": 1, "kg": 1000},
    "capacity": {"mL": 1, "L": 1000},
    "time": {"s": 1, "min": 60, "h": 3600},
}
_UNIT_NAMES = {"mm": "millimeters", "cm": "centimeters", "m": "meters", "km": "kilometers", "g": "grams",
               "kg": "kilograms", "mL": "milliliters", "L": "liters", "s": "seconds", "min": "minutes",
               "h": "hours"}
_EASY_PAIRS = (("m", "cm"), ("kg", "g"), ("h", "min"), ("L", "mL"), ("min", "s"))


def unit_conversion_problem(rng: random.Random, level: int) -> Problem:
    if level == 0:
        big, small = rng.choice(_EASY_PAIRS)
        src, dst = big, small
    else:
        cat = rng.choice(list(UNITS))
        src, dst = rng.sample(list(UNITS[cat]), 2)
    cat = next(c for c, u in UNITS.items() if src in u)
    fs, fd = UNITS[cat][src], UNITS[cat][dst]
    for _ in range(100):
        q = Fraction(rng.randint(1, 9)) if level == 0 else Fraction(rng.randint(1, 400), rng.choice((1, 2, 4, 10)))
        v = q * fs / fd
        if _terminates(v) and len(_num(v)) <= 9 and v >= Fraction(1, 1000):
            break
    else:  # always possible: whole numbers of the bigger unit
        q, v = Fraction(1), Fraction(fs, fd)
    name, he = _name(rng)
    ratio = Fraction(max(fs, fd), min(fs, fd))
    rule = (f"1 {src} = {_num(ratio)} {dst}, so to change {_UNIT_NAMES[src]} to {_UNIT_NAMES[dst]} we multiply by "
            f"{_num(ratio)}: {_num(q)} × {_num(ratio)} = {_num(v)}." if fs > fd else
            f"1 {dst} = {_num(ratio)} {src}, so to change {_UNIT_NAMES[src]} to {_UNIT_NAMES[dst]} we divide by "
            f"{_num(ratio)}: {_num(q)} ÷ {_num(ratio)} = {_num(v)}.")
    steps = [f"{_a(_UNIT_NAMES[src][:-1]).capitalize()} is {'bigger' if fs > fd else 'smaller'} than "
             f"{_a(_UNIT_NAMES[dst][:-1])}, "
             f"so the number should get {'bigger' if fs > fd else 'smaller'}.", rule]
    what = {"length": "walked", "mass": "carried a bag of", "capacity": "poured", "time": "practised for"}[cat]
    story = f"{name} {what} {_num(q)} {_UNIT_NAMES[src]}. How many {_UNIT_NAMES[dst]} is that?"
    if cat == "time":
        story = f"{name} practised the piano for {_num(q)} {_UNIT_NAMES[src]}. How many {_UNIT_NAMES[dst]} is that?"
    elif cat == "mass":
        story = f"{name} carried a bag that weighs {_num(q)} {src}. How many {_UNIT_NAMES[dst]} is that?"
    wrong = [_num(x) for x in (q * fd / fs, v * 10, v / 10, q) if _terminates(x)]
    ans = _num(v)
    return Problem(f"Convert {_num(q)} {src} to {dst}.", f"{_num(q)} {src} = ____ {dst}",
                   f"{_num(q)} {src} = {ans} {dst}", ans, _distinct_wrong(ans, wrong), steps, story)


_WORDS = ("cat", "python", "hello", "sun", "garden", "robot", "piano", "apple", "river", "code", "moon", "tiger")


def python_problem(rng: random.Random, level: int) -> Problem:
    """A Python expression, its value (evaluated here, on an expression built from our own pieces) and why."""
    a, b, c = rng.randint(2, 20), rng.randint(2, 9), rng.randint(1, 9)
    w, w2 = rng.sample(_WORDS, 2)
    pool: list[tuple[str, str, list]] = [  # (expression, the rule it shows, likely wrong values)
        (f"{a} + {b} * {c}", "Python multiplies before it adds, just like in maths.", [(a + b) * c]),
        (f"{a} * {b}", "* is multiplication.", [a + b]),
        (f"len('{w}')", "len() counts the characters in a string.", [len(w) + 1, len(w) - 1]),
        (f"'{w[:2]}' * {b}", "Multiplying a string by a whole number repeats it.", [w[:2] * (b - 1), b * 2]),
        (f"'{w}' + '{w2}'", "+ between two strings joins them with no space.", [f"{w} {w2}"]),
    ]
    if level >= 1:
        pool += [
            (f"{a} // {b}", "// is floor division: it divides and drops the remainder.", [a / b, a % b]),
            (f"{a} % {b}", "% gives the remainder after division.", [a // b, a / b]),
            (f"{a} / {b * 2}", "/ always gives a float, even when the division is exact.", [a // (b * 2)]),
            (f"max({a}, {b}, {c})", "max() returns the largest of its arguments.", [min(a, b, c)]),
            (f"'{w}'.upper()", ".upper() returns the string in capital letters.", [w]),
        ]
    if level >= 2:
        xs = [rng.randint(1, 9) for _ in range(4)]
        i = rng.randint(-4, 3)
        pool += [
            (f"{b} ** {c % 4 + 2}", "** raises to a power.", [b * (c % 4 + 2)]),
            (f"{xs}[{i}]", "Indexes start at 0, and negative indexes count from the end.",
             [xs[(i + 1) % 4], xs[(i - 1) % 4]]),
            (f"sum({xs})", "sum() adds up the items of a list.", [len(xs), max(xs)]),
            (f"'{w}'[1:3]", "A slice [1:3] takes the characters at positions 1 and 2 (the end is excluded).",
             [w[1:4], w[0:3]]),
            (f"{a} > {b} and {b} > {c}", "and is True only when both sides are True.",
             [not ((a > b) and (b > c))]),
            (f"int('{a}') + {b}", "int() turns a string of digits into a number.", [f"{a}{b}"]),
            (f"str({a}) + str({b})", "str() turns numbers into strings, and + joins strings.", [a + b]),
        ]
    expr, rule, wrong_values = rng.choice(pool)
    value = eval(expr, {"__builtins__": {}}, {"len": len, "max": max, "sum": sum, "int": int, "str": str})
    ans = repr(value)
    near = [value + 1, value - 1] if isinstance(value, int) and not isinstance(value, bool) else []
    # plus the classic slip: a number's digits as a string, or a string without its quotes
    wrong = [repr(x) for x in wrong_values + near] + [repr(str(value)) if not isinstance(value, str) else value]
    name, he = _name(rng)
    return Problem(f"What is the value of `{expr}`?", f"`{expr}` evaluates to `____`",
                   f"`{expr}` evaluates to `{ans}`", ans, _distinct_wrong(ans, wrong),
                   [rule, f"So `{expr}` evaluates to `{ans}`."],
                   f"{name} types `{expr}` into the Python shell and presses Enter. What does Python show?")


PROBLEMS: dict[str, Callable[[random.Random, int], Problem]] = {
    "arithmetic": arithmetic_problem,
    "fractions": fractions_problem,
    "percentages": percentages_problem,
    "unit conversion": unit_conversion_problem,
    "python expressions": python_problem,
}


# --- the explanation: (question, answer) pairs, read as prose or as Q&A depending on the style -----------------

_EXPLAIN = {
    ("arithmetic", "child"): [
        ("What does adding mean?", ["Adding means putting groups together. If you have 3 apples and get 2 more, "
                                    "you have 5 apples.", "When we add, we join two amounts to find how many "
                                    "there are in all."]),
        ("What does taking away mean?", ["Taking away, or subtracting, means some things leave the group. If 5 "
                                         "birds sit on a fence and 2 fly off, 3 birds are left.",
                                         "Subtracting tells us how many are left after some are gone."]),
        ("How can I check my answer?", ["Adding and taking away undo each other: if 3 + 2 = 5, then 5 − 2 = 3.",
                                        "You can count on your fingers, or draw dots and count them."]),
    ],
    ("arithmetic", "other"): [
        ("What are the four operations?", ["Addition, subtraction, multiplication and division. Multiplication "
                                           "is repeated addition and division splits a number into equal groups.",
                                           "We combine numbers with +, −, × and ÷; × and ÷ are shortcuts for "
                                           "repeated + and −."]),
        ("In what order do we work?", ["Parentheses first, then multiplication and division from left to right, "
                                       "then addition and subtraction from left to right.",
                                       "Work inside parentheses first; then × and ÷; then + and −. Without this "
                                       "rule 2 + 3 × 4 could mean 20 or 14 - it means 14."]),
        ("How do negative numbers behave?", ["Subtracting a bigger number gives a negative result: 3 − 5 = −2. A "
                                             "negative times a positive is negative.",
                                             "Below zero the number line continues: −1, −2, −3. The product of a "
                                             "negative and a positive number is negative."]),
    ],
    ("fractions", "child"): [
        ("What is a fraction?", ["A fraction is a part of a whole. If a pizza is cut into 4 equal pieces and you "
                                 "eat 1, you ate 1/4 of the pizza.", "When something is shared into equal parts, "
                                 "each part is a fraction. Half a sandwich is 1/2."]),
        ("What do the two numbers mean?", ["The bottom number, the denominator, says how many equal parts there "
                                           "are. The top number, the numerator, says how many parts we have.",
                                           "In 3/4 the 4 tells us the whole has 4 parts and the 3 tells us we "
                                           "have 3 of them."]),
        ("How do I add fractions?", ["When the bottom numbers are the same, add the top numbers and keep the "
                                     "bottom number: 1/4 + 2/4 = 3/4.", "Same-size pieces can be counted "
                                     "together: 2 fifths and 1 fifth make 3 fifths."]),
    ],
    ("fractions", "other"): [
        ("What is a fraction?", ["A fraction a/b is a divided by b: the numerator a counts parts of size 1/b.",
                                 "A fraction names a number between whole numbers, written numerator over "
                                 "denominator."]),
        ("How do we add and subtract fractions?", ["Rewrite both with a common denominator (the least common "
                                                   "multiple of the denominators), then add or subtract the "
                                                   "numerators.", "Only parts of the same size can be added, so "
                                                   "first convert to a common denominator."]),
        ("How do we multiply and divide?", ["Multiply numerators together and denominators together. To divide, "
                                            "multiply by the reciprocal of the second fraction.",
                                            "a/b × c/d = (a×c)/(b×d), and dividing by c/d is multiplying by "
                                            "d/c."]),
        ("Why simplify?", ["Divide numerator and denominator by their greatest common divisor so the answer is "
                           "in simplest form: 6/8 = 3/4.", "Equivalent fractions name the same number; the "
                           "simplest one is easiest to read."]),
    ],
    ("percentages", "child"): [
        ("What is a percent?", ["Percent means 'out of 100'. 50% is 50 out of 100, which is one half.",
                                "A percent is a way to say how many out of 100. 25% is a quarter."]),
        ("How do I find a percent of a number?", ["50% of a number is half of it, 25% is a quarter and 10% is "
                                                  "one tenth.", "To find 10% of something, split it into 10 "
                                                  "equal parts and take one."]),
    ],
    ("percentages", "other"): [
        ("What is a percent?", ["A percent is a fraction with denominator 100: p% = p/100.",
                                "'Per cent' means per hundred, so 15% is 15/100 = 0.15."]),
        ("How do we find a percent of an amount?", ["Multiply the amount by p/100: 15% of 80 = 0.15 × 80 = 12.",
                                                    "Convert the percent to a decimal and multiply."]),
        ("How do we find what percent one number is of another?", ["Divide the part by the whole and multiply "
                                                                   "by 100.", "part ÷ whole × 100 gives the "
                                                                   "percent."]),
        ("How do increases and decreases work?", ["Find the percent of the original amount, then add it (an "
                                                  "increase) or subtract it (a decrease or discount).",
                                                  "A 20% discount leaves 80% of the price to pay."]),
    ],
    ("unit conversion", "child"): [
        ("What is a unit?", ["A unit is what we measure with: meters for length, kilograms for weight, hours "
                             "for time.", "We measure how long, how heavy or how much time with units, like "
                             "centimeters or minutes."]),
        ("How do I change units?", ["1 meter is 100 centimeters, so 2 meters is 200 centimeters. 1 hour is 60 "
                                    "minutes.", "A big unit holds many small units: 1 kilogram is 1000 grams."]),
    ],
    ("unit conversion", "other"): [
        ("How are metric units related?", ["Metric units go in powers of ten: kilo = 1000, centi = 1/100, "
                                           "milli = 1/1000.", "1 km = 1000 m, 1 m = 100 cm, 1 cm = 10 mm; "
                                           "1 kg = 1000 g; 1 L = 1000 mL."]),
        ("Multiply or divide?", ["From a bigger unit to a smaller one, multiply (there are more of the small "
                                 "units); from smaller to bigger, divide.", "Ask which unit is bigger: the number "
                                 "of smaller units is always larger."]),
        ("What about time?", ["Time is not decimal: 1 h = 60 min and 1 min = 60 s, so 1 h = 3600 s.",
                              "Minutes and seconds go in sixties, so 90 minutes is 1.5 hours."]),
    ],
    ("python expressions", "child"): [
        ("What is Python?", ["Python is a language for telling a computer what to do. You can type a sum and "
                             "Python works it out.", "Python is a way to talk to a computer. It can do sums "
                             "for you."]),
        ("What can Python work out?", ["Python can add with +, take away with − and multiply with *. It can also "
                                       "count letters with len().", "Type 2 + 3 and Python says 5. Words go in "
                                       "quotes, like 'cat'."]),
    ],
    ("python expressions", "other"): [
        ("What is an expression?", ["An expression is code that Python evaluates to a value, like 2 + 3 or "
                                    "len('hi').", "Anything that produces a value is an expression: numbers, "
                                    "strings, operators and function calls."]),
        ("Which operators are there?", ["+ − * / are the usual operators; // is floor division, % the "
                                        "remainder and ** the power. / always returns a float.",
                                        "Arithmetic follows the usual precedence: ** first, then * / // %, "
                                        "then + and −."]),
        ("What about strings and lists?", ["Strings can be joined with + and repeated with *; indexes start at "
                                           "0 and negative indexes count from the end.", "len() gives the "
                                           "length, slices like s[1:3] take part of a string or list."]),
    ],
}

_TITLES = {
    "arithmetic": ("Adding and Subtracting", "Working with Numbers", "The Four Operations", "Order of Operations"),
    "fractions": ("Fractions", "Parts of a Whole", "Adding and Subtracting Fractions", "Working with Fractions"),
    "percentages": ("Percentages", "Out of 100", "Finding Percentages", "Percent Problems"),
    "unit conversion": ("Units of Measure", "Converting Units", "Meters, Grams and Minutes", "Changing Units"),
    "python expressions": ("Python Expressions", "What Does Python Say?", "Values and Operators in Python",
                           "Evaluating Expressions"),
}

_OPEN = {
    "friendly and encouraging": ("Welcome! In this section we will explore {topic} together. Don't worry, you "
                                 "will soon be an expert!", "Hi there! Today is all about {topic}. Take it one "
                                 "idea at a time and have fun."),
    "concise and formal": ("This section covers {topic}.", "In this section we define the main ideas of {topic} "
                           "and apply them."),
    "step by step": ("We will learn {topic} one step at a time: first the idea, then worked examples, then "
                     "practice.", "Follow each step in order and {topic} will make sense."),
    "story-based": ("{name} needed to understand {topic}, and {he} learned it the way you will now: by working "
                    "through real problems.", "One afternoon {name} found a puzzle about {topic}. Let's help "
                    "{him} solve it."),
    "question and answer": ("Here are the questions people ask most about {topic}, with short answers.",
                            "Let's learn {topic} by asking questions and answering them."),
}
_AUDIENCE_NOTE = {
    "young children (ages 6-8)": ("Grab a pencil, and use your fingers if it helps.",
                                  "Ask a grown-up to read along with you."),
    "primary school students (ages 9-11)": ("You will use this in class and at home.",
                                            "Have some scrap paper ready for working out."),
    "middle school students": ("This idea comes back again and again in later math and science.",
                               "Write down each step; it makes mistakes easy to find."),
    "high school students": ("Exams expect you to do this quickly and accurately, so practise until it is "
                             "automatic.", "Pay attention to the rules: they matter more than the numbers."),
    "adult beginners": ("Whether you are checking a bill or helping with homework, this comes up every day.",
                        "No background is assumed; we start from the basics."),
}
_CLOSE = {
    "friendly and encouraging": ("Great work! Check your answers below and be proud of every one you got right.",
                                 "You did it! Practice a little every day and it gets easier."),
    "concise and formal": ("Answers are given below.", "Compare your solutions with the answer key."),
    "step by step": ("Check each answer step by step against the key.", "If an answer is wrong, redo it one "
                     "step at a time."),
    "story-based": ("{name} checked {his} answers, and now you can check yours.", "{name} smiled: the puzzle "
                    "was solved. Now check your own answers."),
    "question and answer": ("Q: How did I do?\nA: Check the answer key below.", "Q: Where are the answers?\n"
                            "A: Right below."),
}
_INSTRUCTIONS = {
    ("short answer", "child"): ("Can you solve these?", "Try these on your own."),
    ("short answer", "other"): ("Solve each problem.", "Work out each answer and show your steps."),
    ("multiple choice", "child"): ("Pick the right answer: A, B, C or D.", "Circle the correct answer."),
    ("multiple choice", "other"): ("Choose the correct answer.", "Select one option for each question."),
    ("fill in the blank", "child"): ("Fill in the missing number.", "What goes in the blank?"),
    ("fill in the blank", "other"): ("Fill in each blank.", "Complete each statement."),
    ("true or false", "child"): ("Is it true or false?", "Say true or false for each one."),
    ("true or false", "other"): ("Decide whether each statement is true or false.", "Mark each statement true "
                                 "or false; correct the false ones."),
    ("word problems", "child"): ("Read each story and find the answer.", "Solve these little stories."),
    ("word problems", "other"): ("Solve each word problem.", "Read carefully, write the calculation, then "
                                 "solve."),
}


def write_section(s: TextbookSeed) -> str:
    """The offline teacher: a textbook section for a computable topic (deterministic given s)."""
    if not can_write_offline(s.topic):
        raise ValueError(f"no offline writer for topic {s.topic!r}")
    rng = random.Random(s.seed)
    level, register = AUDIENCES[s.audience]
    reg = "child" if register == "child" else "other"
    name, he = _name(rng)
    pron = {"he": ("him", "his"), "she": ("her", "her")}[he]
    fill = {"topic": s.topic, "name": name, "he": he, "him": pron[0], "his": pron[1]}
    make = PROBLEMS[s.topic]
    out = [f"# {rng.choice(_TITLES[s.topic])}",
           f"{rng.choice(_OPEN[s.style]).format(**fill)} {rng.choice(_AUDIENCE_NOTE[s.audience])}"]

    qa = _EXPLAIN[(s.topic, reg)]
    qa = qa[:1] + rng.sample(qa[1:], k=rng.randint(max(1, len(qa) - 2), len(qa) - 1))
    if s.style == "question and answer":
        out += [f"**Q: {q}**\nA: {rng.choice(answers)}" for q, answers in qa]
    else:
        out.append(" ".join(rng.choice(answers) for _, answers in qa))

    out.append("## Worked examples" if register != "child" else "## Let's try some together")
    for k in range(3 if s.style == "step by step" else 2):
        p = make(rng, level)
        ask = p.story if s.style == "story-based" else p.question
        if s.style == "step by step":
            body = "\n".join(f"Step {j + 1}: {x}" for j, x in enumerate(p.steps))
        else:
            body = " ".join(p.steps)
        lead = "Q" if s.style == "question and answer" else f"Example {k + 1}"
        out.append(f"**{lead}:** {ask}\n{'A: ' if lead == 'Q' else ''}{body}\nAnswer: {p.equation}.")

    out.append("## Exercises")
    out.append(rng.choice(_INSTRUCTIONS[(s.exercise, reg)]))
    exercises, key = [], []
    for k in range(1, rng.randint(4, 6) + 1):
        p = make(rng, level)
        if s.exercise == "multiple choice":
            options = [p.answer] + rng.sample(p.wrong, k=min(3, len(p.wrong)))
            rng.shuffle(options)
            letter = "ABCD"[options.index(p.answer)]
            opts = "  ".join(f"{'ABCD'[j]}) {o}" for j, o in enumerate(options))
            exercises.append(f"{k}. {p.question}\n   {opts}")
            key.append(f"{k}. {letter}) {p.answer}: {p.equation}")
        elif s.exercise == "true or false":
            shown = p.answer if rng.random() < 0.5 or not p.wrong else rng.choice(p.wrong)
            statement = p.blank.replace("____", shown)
            exercises.append(f"{k}. True or false: {statement}")
            key.append(f"{k}. {'True' if shown == p.answer else 'False'}: {p.equation}")
        elif s.exercise == "fill in the blank":
            exercises.append(f"{k}. {p.blank}")
            key.append(f"{k}. {p.answer}: {p.equation}")
        elif s.exercise == "word problems":
            exercises.append(f"{k}. {p.story}")
            key.append(f"{k}. {p.answer}: {p.equation}")
        else:
            exercises.append(f"{k}. {p.question}")
            key.append(f"{k}. {p.answer}: {p.equation}")
    out.append("\n".join(exercises))
    out.append(rng.choice(_CLOSE[s.style]).format(**fill))
    out.append("## Answer key\n" + "\n".join(key))
    return "\n\n".join(out)
