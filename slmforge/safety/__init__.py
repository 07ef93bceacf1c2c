"""Safety: red-team scans of any LM spec and guardrails for `slmforge serve` (issue 15).

    probes.py      probe suites as data files (JSONL/CSV): harmful requests (AdvBench, HarmBench), jailbreak
                   wrappers, prompt injection in documents, system-prompt extraction, PII canaries, and a
                   benign set that looks risky (over-refusal)
    detectors.py   refusal rules, canary/secret matching, an LM judge
    classifier.py  the harmful-request / harmful-compliance classifier trained here (TF-IDF + logistic
                   regression, saved without pickle), split by behaviour
    scan.py        `slmforge redteam scan`: N generations per probe against a model dir, our server or any
                   OpenAI-compatible URL; attack success per category with bootstrap 95% CIs; JSONL hit log,
                   Markdown/HTML report; resumable; concurrent
    guard.py       the guard `slmforge serve --guard CONFIG` runs on inputs and outputs: refuse / redact / flag
"""
