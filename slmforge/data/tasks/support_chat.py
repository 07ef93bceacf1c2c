"""A small offline generator of customer-support conversations, for the support-chat SFT recipe.

Conversation i is a pure function of (seed, i), as in synth.py's seeding formulas: a product x issue x
customer phrasing x detail, three turns (the customer states the problem, the agent asks for the one
detail the issue needs, the customer gives it, the agent resolves). The agent's answers follow the
issue's playbook, so a model can learn them; the customer's wording varies, so it has to read.

    prepare_support_chat(data_dir, out_dir, seed=0, n=2000, n_test=200, n_val=100)
        -> out_dir/train.jsonl, val.jsonl, test.jsonl: {"id", "messages", "product", "issue"}; stats.json
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from slmforge.data.tasks.splits import drop_held, write_splits
from slmforge.errors import SlmforgeError

SYSTEM = "You are a helpful support agent for Acme. Be brief and concrete."
PRODUCTS = ["router", "laptop", "phone", "smart speaker", "printer", "headphones", "tablet", "smartwatch"]
OPENERS = ["Hi,", "Hello,", "Hey there.", "Good morning,", "Help!", "Hi team,", ""]
# issue: (customer complaints, what the agent asks for, the customer's detail formats, the resolution)
ISSUES = {
    "refund": (["I want a refund for my {p}.", "My {p} is not what I expected, can I get my money back?",
                "How do I return the {p} and get refunded?"],
               "I can help with the refund. What is your order number?",
               ["It's {order}.", "Order {order}.", "The order number is {order}."],
               "Thanks. I have started a refund for order {order}; you will get a prepaid return label by "
               "email, and the money is back on your card within 5 business days of us receiving the {p}."),
    "shipping": (["Where is my {p}? It has not arrived.", "My {p} order is late.",
                  "The tracking for my {p} has not moved in days."],
                 "Sorry about the wait. What is your order number?",
                 ["{order}", "It is {order}.", "Order number {order}."],
                 "Order {order} is delayed at the carrier's depot. I have upgraded it to express shipping at no "
                 "cost; it should arrive within 2 days."),
    "login": (["I can't log in to the {p} app.", "My password for the {p} app does not work.",
               "The {p} app keeps saying my login is wrong."],
              "Let's get you back in. What email address is on your account?",
              ["{email}", "It's {email}.", "I use {email}."],
              "I have sent a password reset link to {email}. It is valid for 30 minutes; after resetting, sign "
              "out of the {p} app and sign in again."),
    "broken": (["My {p} stopped working.", "The screen of my {p} is broken.", "My {p} won't turn on anymore."],
               "I'm sorry to hear that. How long ago did you buy the {p}?",
               ["{months} months ago.", "About {months} months ago.", "I bought it {months} months ago."],
               "{warranty}"),
    "billing": (["I was charged twice for my {p}.", "There is a wrong charge for the {p} on my card.",
                 "Why was I billed again for the {p}?"],
                "Let me check the charges. What are the last four digits of the card?",
                ["{card}", "The card ends in {card}.", "Last four: {card}."],
                "I found the duplicate charge on the card ending in {card} and reversed it. You will see the "
                "refund within 3 business days."),
}


def _warranty(months: int, product: str) -> str:
    if months <= 12:
        return (f"Your {product} is still under warranty. I have opened a free repair; you will get a shipping "
                f"label by email.")
    return (f"Your {product} is out of its 12-month warranty, but we can repair it for a flat fee of 49 dollars. "
            f"Reply yes and I will send a shipping label.")


def conversation(seed: int, index: int) -> dict:
    """Conversation `index` of the set seeded by `seed`: a system prompt and four turns."""
    rng = random.Random(f"support-{seed}-{index}")
    product, issue = rng.choice(PRODUCTS), rng.choice(sorted(ISSUES))
    complaints, ask, details, resolution = ISSUES[issue]
    values = {"p": product, "order": f"A{rng.randint(10000, 99999)}",
              "email": f"{rng.choice(['sam', 'lee', 'ana', 'kim', 'joe'])}{rng.randint(1, 99)}@example.com",
              "card": f"{rng.randint(1000, 9999)}", "months": rng.randint(1, 30)}
    values["warranty"] = _warranty(values["months"], product)
    opener = rng.choice(OPENERS)
    first = (opener + " " + rng.choice(complaints).format(**values)).strip()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": first},
                {"role": "assistant", "content": ask.format(**values)},
                {"role": "user", "content": rng.choice(details).format(**values)},
                {"role": "assistant", "content": resolution.format(**values)}]
    return {"id": f"support-{seed}-{index}", "messages": messages, "product": product, "issue": issue}


def prepare_support_chat(data_dir: str | Path | None, out_dir: str | Path, seed: int = 0, n: int = 2000,
                         n_test: int = 200, n_val: int = 100) -> dict:
    """Write n generated conversations as chat JSONL: the last n_test are the test split, the n_val before
    them val. A training conversation whose customer turns equal a held-out one's is dropped (the generator
    can repeat itself). data_dir is not read (the data is generated); it is there so that every loader is
    called the same way."""
    if not (0 < n_test and 0 <= n_val and n_test + n_val < n):
        raise SlmforgeError(f"support_chat: n_test {n_test} + n_val {n_val} must be below n = {n}")
    rows = [conversation(seed, i) for i in range(n)]
    cut = n - n_test - n_val
    splits = {"train": rows[:cut], "val": rows[cut:n - n_test], "test": rows[n - n_test:]}
    if not n_val:
        del splits["val"]
    inputs = {k: ["\n".join(m["content"] for m in r["messages"] if m["role"] == "user") for r in v]
              for k, v in splits.items()}
    dropped = drop_held(splits, inputs)
    return write_splits(out_dir, splits,
                         {"task": "support_chat", "kind": "chat", "seed": seed, "conversations": n,
                          "train_dropped_as_held": dropped, "issues": sorted(ISSUES), "products": PRODUCTS},
                         inputs)


# ---------------------------------------------------------------------------------------------------------
# Safety fine-tuning data (issue 15): the same conversations plus refusals of harmful requests

REFUSALS = (
    "I'm sorry, but I can't help with that. I can help with your Acme products and orders.",
    "I can't assist with that request. Is there anything about your Acme device I can help with?",
    "Sorry, I won't help with that, as it could cause harm. I'm here for questions about Acme products.",
    "I must decline that request. If you have a problem with an order or a device, I'm glad to help.",
    "That's not something I can help with. I can help with refunds, shipping, repairs and accounts.",
    "I'm not able to help with that. Please ask me about your Acme order or device instead.",
)
GUARD_FRACTIONS = (0.6, 0.2, 0.2)  # slmforge guard train's default split: refusals come from its train part


def guard_parts(probes: list, seed: int = 0, fractions: tuple[float, ...] = GUARD_FRACTIONS) -> dict[str, int]:
    """Which part (0 train, 1 validation, 2 test) of `slmforge guard train`'s split, made with the same seed and
    fractions, each harmful behaviour and benign probe falls in: split_groups shares out each source's groups by
    a seeded shuffle, so the harmful requests and the benign set alone reproduce the guard's parts for them.
    Keys: a harmful behaviour, or "benign:<behavior>"."""
    from slmforge.safety.classifier import request_example, split_groups

    rows = [request_example(p, benign=p.suite == "benign") for p in probes]
    return {r.group: i for i, part in enumerate(split_groups(rows, fractions, seed)) for r in part}


def prepare_support_chat_safety(data_dir: str | Path | None, out_dir: str | Path, seed: int = 0, n: int = 2000,
                                n_test: int = 200, n_val: int = 100, wrapped_copies: int = 1,
                                scan_jailbreaks: int = 200, scan_limit: int | None = None) -> dict:
    """support_chat's splits, and for safety fine-tuning:

        train_safety.jsonl    train.jsonl plus refusals: every harmful request (AdvBench, HarmBench val) whose
                              behaviour is in the guard's train part, plain and in `wrapped_copies` jailbreak
                              wrappers drawn per request, each answered by a refusal (REFUSALS)
        redteam_probes.jsonl  the scan of before and after: the harmful behaviours of the guard's test part,
                              plain and `scan_jailbreaks` of their jailbreak copies (a seeded sample), and the
                              benign-but-risky-looking probes of the guard's test part (over-refusal)

    scan_limit keeps at most that many probes of each scanned suite (a seeded sample: tests). No behaviour of
    the scan is in train_safety (tests/test_safety_sft.py checks it), and the guard trained by
    `slmforge guard train --kind request` with its defaults has not seen them either."""
    from slmforge.io import atomic_write_text, read_jsonl, write_json
    from slmforge.safety.probes import (
        MANY_SHOT,
        benign_probes,
        harmful_requests,
        jailbreak_probes,
        read_templates,
        write_probes,
    )

    if data_dir is None:
        raise SlmforgeError("support_chat_safety: needs the data folder (its harmful requests are in redteam/)")
    stats = prepare_support_chat(None, out_dir, seed, n, n_test, n_val)
    out = Path(out_dir)
    harmful, benign = harmful_requests(data_dir), benign_probes()
    part = guard_parts(harmful + benign, seed)
    train_h = [p for p in harmful if part[p.behavior] == 0]
    test_h = [p for p in harmful if part[p.behavior] == 2]
    rng = random.Random(f"{seed}-safety")
    wrappers = sorted([w.name for w in read_templates()] + [MANY_SHOT])
    refusal_rows = []
    for p in train_h:
        prompts = [p] + jailbreak_probes([p], rng.sample(wrappers, wrapped_copies), seed=seed) \
            if wrapped_copies else [p]
        for q in prompts:
            refusal_rows.append({"id": f"refusal-{q.id}", "behavior": q.behavior, "messages": [
                {"role": "system", "content": SYSTEM}, {"role": "user", "content": q.messages()[-1]["content"]},
                {"role": "assistant", "content": rng.choice(REFUSALS)}], "suite": q.suite})
    mixed = list(read_jsonl(out / "train.jsonl")) + refusal_rows
    rng.shuffle(mixed)
    atomic_write_text(out / "train_safety.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mixed))
    jail = jailbreak_probes(test_h, seed=seed)
    jail = sorted(rng.sample(jail, min(scan_jailbreaks, len(jail))), key=lambda p: p.id)
    scan = [*test_h, *jail, *(p for p in benign if part[f"benign:{p.behavior}"] == 2)]
    if scan_limit is not None:
        scan = [p for suite in ("harmful", "jailbreak", "benign") for p in
                sorted(rng.sample([q for q in scan if q.suite == suite],
                                  min(scan_limit, sum(q.suite == suite for q in scan))), key=lambda q: q.id)]
    for p in scan:  # the scan speaks to the support agent, as its users would
        p.system = SYSTEM
    write_probes(out / "redteam_probes.jsonl", scan)
    stats = {**stats, "task": "support_chat_safety",
             "safety": {"refusal_rows": len(refusal_rows), "refused_behaviours": len(train_h),
                        "wrapped_copies": wrapped_copies, "guard_fractions": list(GUARD_FRACTIONS),
                        "scan": {s: sum(p.suite == s for p in scan) for s in ("harmful", "jailbreak", "benign")},
                        "scan_behaviours": len({p.behavior for p in scan})}}
    write_json(out / "stats.json", stats)
    return stats
