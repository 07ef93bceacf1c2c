"""llama2.c import: the tokenizer must encode exactly like run.c, the model must compute what llama2.c's
model.py computes, and the directory must load in transformers. References are written out here in
plain Python/torch from llama2.c's algorithms, reading the raw .bin files independently of slmforge."""

import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slmforge.errors import SlmforgeError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"
MODEL_BIN, TOK_BIN, VALID = DATA / "stories260K.bin", DATA / "tok512.bin", DATA / "tinystories_valid_part1.txt"


def need(*paths: Path) -> None:
    for p in paths:
        if not p.is_file():
            pytest.skip(f"{p} not available")


def paragraphs(n: int) -> list[str]:
    # The procedure of ../shared/data/SOURCES.md: split on blank lines, stripped, empty ones dropped.
    text = VALID.read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()][:n]


# -----------------------------------------------------------------------------
# reference: run.c's tokenizer


def read_tokenizer_bin(path: Path) -> tuple[list[str], list[float]]:
    data = path.read_bytes()
    pieces, scores, off = [], [], 4
    while off < len(data):
        score, n = struct.unpack_from("<fi", data, off)
        pieces.append(data[off + 8:off + 8 + n].decode("utf-8"))
        scores.append(score)
        off += 8 + n
    return pieces, scores


def runc_encode(text: str, pieces: list[str], scores: list[float]) -> list[int]:
    """run.c `encode` without bos/eos: dummy prefix, codepoints or bytes, then greedy best-score merges."""
    lookup = {p: i for i, p in enumerate(pieces)}
    if not text:
        return []
    toks = [lookup[" "]]
    for ch in text:
        toks += [lookup[ch]] if ch in lookup else [b + 3 for b in ch.encode("utf-8")]
    while True:
        best, best_i, best_id = -1e10, -1, -1
        for i in range(len(toks) - 1):
            j = lookup.get(pieces[toks[i]] + pieces[toks[i + 1]], -1)
            if j != -1 and scores[j] > best:  # strictly greater: leftmost wins ties
                best, best_i, best_id = scores[j], i, j
        if best_i == -1:
            return toks
        toks[best_i:best_i + 2] = [best_id]


TRICKY = ["", " ", "  ", "a", " leading", "trailing ", "two\n\nlines\n", "tab\there", "crlf\r\nend",
          "Zoë and Chloé café", "日本語", "emoji 😀🚀 ok", "...!!!???", "aaaa aaaaa", "  Once upon a time  ",
          "\u200b zero width", "‘quotes’ — dash"]


def test_tokenizer_matches_runc():
    need(TOK_BIN, VALID)
    from slmforge.convert.llama2c import read_llama2c_tokenizer

    tok = read_llama2c_tokenizer(TOK_BIN)
    pieces, scores = read_tokenizer_bin(TOK_BIN)
    texts = paragraphs(300) + TRICKY
    ours = tok.encode_batch(texts)
    for text, ids in zip(texts, ours, strict=True):
        assert ids == runc_encode(text, pieces, scores), text
        assert tok.decode(ids) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, None, 512)
    assert tok.decode([1, *tok.encode("Once upon"), 2]) == "Once upon"  # specials skipped


def test_tokenizer_bad_input(tmp_path):
    need(TOK_BIN)
    from slmforge.convert.llama2c import read_llama2c_tokenizer

    with pytest.raises(SlmforgeError, match="no such"):
        read_llama2c_tokenizer(tmp_path / "missing.bin")
    (tmp_path / "cut.bin").write_bytes(TOK_BIN.read_bytes()[:-3])
    with pytest.raises(SlmforgeError, match="bad length|truncated"):
        read_llama2c_tokenizer(tmp_path / "cut.bin")
    if MODEL_BIN.is_file():  # a model file passed as the tokenizer
        with pytest.raises(SlmforgeError):
            read_llama2c_tokenizer(MODEL_BIN)


# -----------------------------------------------------------------------------
# reference: llama2.c's model.py forward on the raw arrays (interleaved RoPE from the file's freq tables)


def read_legacy_bin(path: Path) -> tuple[dict, dict]:
    data = path.read_bytes()
    dim, hidden, L, H, KV, V, S = struct.unpack_from("<7i", data, 0)
    hd = dim // H
    flat = torch.frombuffer(bytearray(data[28:]), dtype=torch.float32)
    shapes = [("emb", (abs(V), dim)), ("attn_norm", (L, dim)), ("wq", (L, dim, dim)), ("wk", (L, KV * hd, dim)),
              ("wv", (L, KV * hd, dim)), ("wo", (L, dim, dim)), ("ffn_norm", (L, dim)), ("w1", (L, hidden, dim)),
              ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)), ("norm", (dim,)), ("cos", (S, hd // 2)),
              ("sin", (S, hd // 2))]
    w, pos = {}, 0
    for name, shape in shapes:
        n = math.prod(shape)
        w[name] = flat[pos:pos + n].view(shape)
        pos += n
    w["wcls"] = w["emb"] if V > 0 else flat[pos:].view(-V, dim)
    return dict(dim=dim, L=L, H=H, KV=KV, hd=hd), w


def ref_forward(p: dict, w: dict, idx: torch.Tensor) -> torch.Tensor:
    """llama2.c model.py Transformer.forward for one sequence (T,), returning (T, vocab) logits."""
    def rmsnorm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight

    def rope(x, cos, sin):  # x (T, heads, hd): rotate interleaved pairs (x0,x1),(x2,x3)...
        xr, xi = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        c, s = cos[:, None], sin[:, None]
        return torch.stack([xr * c - xi * s, xr * s + xi * c], dim=-1).flatten(-2)

    T = idx.shape[0]
    cos, sin = w["cos"][:T], w["sin"][:T]
    x = w["emb"][idx]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(p["L"]):
        h = rmsnorm(x, w["attn_norm"][i])
        q = rope((h @ w["wq"][i].T).view(T, p["H"], p["hd"]), cos, sin)
        k = rope((h @ w["wk"][i].T).view(T, p["KV"], p["hd"]), cos, sin)
        v = (h @ w["wv"][i].T).view(T, p["KV"], p["hd"])
        rep = p["H"] // p["KV"]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = (q.transpose(0, 1) @ k.transpose(0, 1).transpose(1, 2)) / math.sqrt(p["hd"]) + mask
        y = (att.softmax(-1) @ v.transpose(0, 1)).transpose(0, 1).reshape(T, -1)
        x = x + y @ w["wo"][i].T
        h = rmsnorm(x, w["ffn_norm"][i])
        x = x + (F.silu(h @ w["w1"][i].T) * (h @ w["w3"][i].T)) @ w["w2"][i].T
    return rmsnorm(x, w["norm"]) @ w["wcls"].T


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    need(MODEL_BIN, TOK_BIN)
    from slmforge.convert.llama2c import import_llama2c

    return import_llama2c(MODEL_BIN, TOK_BIN, tmp_path_factory.mktemp("l2c") / "stories260K")


def greedy(logits_fn, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(logits_fn(torch.tensor(ids))[-1].argmax()))
    return ids


def test_model_matches_llama2c_reference(imported):
    from slmforge.modeldir import ModelDir

    md = ModelDir.open(imported)
    assert md.meta["stage"] == "import-llama2c" and md.meta["source"] == str(MODEL_BIN)
    model, tok = md.load_model(), md.load_tokenizer()
    p, w = read_legacy_bin(MODEL_BIN)
    prompt = tok.encode("Once upon a time, there was a little", bos=True)

    with torch.no_grad():
        ours = greedy(lambda x: model(x[None])[0][0], prompt, 40)
        ref = greedy(lambda x: ref_forward(p, w, x), prompt, 40)
        assert ours == ref
        seq = torch.tensor(ours)
        diff = (model(seq[None])[0][0] - ref_forward(p, w, seq)).abs().max().item()
    assert diff < 1e-4
    assert len(tok.decode(ours[len(prompt):])) > 40  # a real continuation, not eos right away


def test_transformers_loads_import(imported):
    transformers = pytest.importorskip("transformers")
    from slmforge.modeldir import ModelDir

    md = ModelDir.open(imported)
    model, tok = md.load_model(), md.load_tokenizer()
    hf = transformers.AutoModelForCausalLM.from_pretrained(imported).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(imported)
    text = "Lily saw a big red ball in the park. She said, \"Can I play?\""
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    ids = torch.tensor([tok.encode(text, bos=True)])
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)[0]).abs().max().item()
    assert diff < 1e-4


def write_v1(path: Path, cls: torch.Tensor | None = None) -> None:
    """llama2.c export.py version1_export, from the legacy arrays (cls: an unshared classifier)."""
    data = MODEL_BIN.read_bytes()
    header = list(struct.unpack_from("<7i", data, 0))
    p, w = read_legacy_bin(MODEL_BIN)
    head = struct.pack("<Ii7iB", 0x616B3432, 1, *header, int(cls is None))
    order = ["attn_norm", "ffn_norm", "norm", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    tensors = [w[k] for k in order] + ([cls] if cls is not None else [])
    path.write_bytes(head + bytes(256 - len(head)) + b"".join(t.contiguous().numpy().tobytes() for t in tensors))


def test_version1_and_unshared_classifier(tmp_path):
    need(MODEL_BIN)
    from slmforge.convert.llama2c import read_llama2c_checkpoint

    cfg0, sd0 = read_llama2c_checkpoint(MODEL_BIN)
    assert cfg0.tie_word_embeddings and cfg0.vocab_size == 512 and cfg0.num_key_value_heads == 4
    write_v1(tmp_path / "v1.bin")
    cfg1, sd1 = read_llama2c_checkpoint(tmp_path / "v1.bin")
    assert cfg1 == cfg0 and all(torch.equal(sd0[k], sd1[k]) for k in sd0)

    cls = torch.randn(512, 64)
    write_v1(tmp_path / "v1u.bin", cls)
    cfg, sd = read_llama2c_checkpoint(tmp_path / "v1u.bin")
    assert not cfg.tie_word_embeddings and torch.equal(sd["lm_head.weight"], cls)
    # the same in the legacy format: negative vocab size, classifier appended
    data = MODEL_BIN.read_bytes()
    header = list(struct.unpack_from("<7i", data, 0))
    header[5] = -header[5]
    (tmp_path / "v0u.bin").write_bytes(struct.pack("<7i", *header) + data[28:] + cls.numpy().tobytes())
    cfg, sd = read_llama2c_checkpoint(tmp_path / "v0u.bin")
    assert not cfg.tie_word_embeddings and torch.equal(sd["lm_head.weight"], cls)


def test_bad_checkpoints(tmp_path):
    need(MODEL_BIN, TOK_BIN)
    from slmforge.convert.llama2c import import_llama2c, read_llama2c_checkpoint

    data = MODEL_BIN.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[:-1000])
    with pytest.raises(SlmforgeError, match="truncated"):
        read_llama2c_checkpoint(cut)
    (tmp_path / "junk.bin").write_bytes(b"\xff" * 4096)
    with pytest.raises(SlmforgeError, match="not a llama2.c checkpoint"):
        read_llama2c_checkpoint(tmp_path / "junk.bin")
    with pytest.raises(SlmforgeError, match="no such"):
        read_llama2c_checkpoint(tmp_path / "missing.bin")
    with pytest.raises(SlmforgeError, match="no such"):
        import_llama2c(MODEL_BIN, tmp_path / "missing_tok.bin", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    exe = Path(sys.executable).with_name("slmforge")
    r = subprocess.run([str(exe), "import", "llama2c", str(cut), str(TOK_BIN), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "truncated" in lines[0]


# -----------------------------------------------------------------------------
# the published-procedure validation loss (../shared/data/SOURCES.md): 1.321 with 512-token windows


def test_val_loss_matches_reference(imported):
    need(VALID)
    from slmforge.modeldir import ModelDir

    md = ModelDir.open(imported)
    model, tok = md.load_model(), md.load_tokenizer()
    paras = paragraphs(800)
    ids = []
    for p, enc in zip(paras, tok.encode_batch(paras), strict=True):
        ids += ([tok.bos_id] if p.startswith("Once upon") else []) + enc  # BOS before each story start
    T = 512
    n = (len(ids) - 1) // T
    data = torch.tensor(ids[:n * T + 1])
    x, y = data[:-1].view(n, T), data[1:].view(n, T)
    with torch.no_grad():
        loss = sum(model(x[i:i + 16], y[i:i + 16])[1].item() * len(x[i:i + 16]) for i in range(0, n, 16)) / n
    assert n == 144
    assert abs(loss - 1.321) < 0.01, loss


def test_generation_stops_at_next_story(imported):
    # TinyStories models mark a new story with <s>; like run.c, generation ends there (also after reload).
    from slmforge.infer.engine import SamplingParams, generate_ids
    from slmforge.modeldir import ModelDir

    md = ModelDir.open(imported)
    tok = md.load_tokenizer()
    assert set(tok.stop_ids) == {1, 2}
    model = md.load_model()
    for seed in range(3):
        ids = list(generate_ids(model, tok.encode("Once upon a time", bos=True),
                                SamplingParams(max_new_tokens=400, temperature=1.0, seed=seed), tok.stop_ids))
        assert 1 not in ids and 2 not in ids
