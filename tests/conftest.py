import random
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
