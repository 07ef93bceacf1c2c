import random
import threading
import time
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(rel: str) -> Path:
    """A file from ../shared/data, or skip the test when this checkout has none."""
    p = DATA / rel
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


def small_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Made-up sentences: enough for a tokenizer and a tiny model, without any data files."""
    rng = random.Random(seed)
    names = ["Tom", "Lily", "Sam", "Mia", "Ben", "Zoë"]
    things = ["ball", "cat", "tree", "red kite", "big boat", "little bird"]
    verbs = ["saw", "liked", "found", "lost", "wanted", "drew"]
    return [" ".join(f"{rng.choice(names)} {rng.choice(verbs)} the {rng.choice(things)}."
                     for _ in range(rng.randint(2, 6))) for _ in range(n)]


def classify_rows(n: int, seed: int = 0) -> list[dict]:
    """The label word is in the text: learnable by a tiny model in a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["cat", "dog"])
        words = [rng.choice(["Tom", "Lily", "saw", "the", "big"]) for _ in range(4)]
        rows.append({"text": " ".join(words + [label, "."] + words[:2]), "label": label})
    return rows


TINY_LLAMA = dict(vocab_size=320, hidden_size=32, intermediate_size=86, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def save_tiny_llama(path: Path) -> Path:
    """A random TINY_LLAMA with a small_corpus tokenizer, saved as a model directory (fine-tuning tests)."""
    from slmforge.config import ModelConfig
    from slmforge.model import LlamaModel
    from slmforge.modeldir import save_model_dir
    from slmforge.tokenizer import train_tokenizer

    model = LlamaModel(ModelConfig(**TINY_LLAMA))
    model.reset_parameters(seed=0)
    return save_model_dir(path, model, train_tokenizer(small_corpus(), vocab_size=320), {"stage": "test"})


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from slmforge.tokenizer import train_tokenizer

    return train_tokenizer(small_corpus(), vocab_size=320)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from slmforge.config import preset
    from slmforge.model import LlamaModel

    torch.manual_seed(0)
    return LlamaModel(preset("200k", vocab_size=tiny_tokenizer.vocab_size))


@pytest.fixture()
def tiny_model_dir(tmp_path, tiny_model, tiny_tokenizer):
    from slmforge.modeldir import save_model_dir

    return save_model_dir(tmp_path / "model", tiny_model, tiny_tokenizer, {"stage": "test"})


class LiveServer:
    """An ASGI app served by uvicorn in a thread on a free port, for clients that need real HTTP (the
    openai client, streaming, a browser). `base` is http://127.0.0.1:PORT, `url` is base + /v1."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.base = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        self.url = self.base + "/v1"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


def run_cli(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """Run the CLI in this process, as `slmforge ARGS` would (main() turns errors into lines): (exit code,
    stdout, stderr)."""
    import sys

    from slmforge import cli

    monkeypatch.setattr(sys, "argv", ["slmforge", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    return e.value.code or 0, out, err
