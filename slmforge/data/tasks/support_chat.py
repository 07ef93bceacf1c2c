"""A small offline generator of customer-support conversations, for the support-chat SFT recipe.

Conversation i is a pure function of (seed, i), as in synth.py's seeding formulas: a product x issue x
customer phrasing x detail, three turns (the customer states the problem, the agent asks for the one
detail the issue needs, the customer gives it, the agent resolves). The agent's answers follow the
issue's playbook, so a model can learn them; the customer's wording varies, so it has to read.

    prepare_support_chat(data_dir, out_dir, seed=0, n=2000, n_test=200, n_val=100)
        -> out_dir/train.jsonl, val.jsonl, test.jsonl: {"id", "messages", "product", "issue"}; stats.json
"""

from __future__ import annotations

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
