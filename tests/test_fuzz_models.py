"""Input fuzzing (issue 16), model directories: config.json, slmforge.json, model.safetensors (bytes and
header: shapes, dtypes, offsets), quantized.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json and chat_template.jinja, read by every command that opens a model, and the GGUF export
that reads them all (slmforge writes GGUF; it reads none). A directory with one mutated file is used whole:
opened, weights and tokenizer loaded, a few tokens generated; or refused with a SlmforgeError naming the
directory or the file."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from input_fuzz import edited, file_bytes, fuzz_settings, read_or_error, single_thread

from conftest import run_cli, save_tiny_llama


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # torch on one thread here: two threads on the two shared cores spin-wait (input_fuzz.single_thread)
    yield from single_thread()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("fuzz-models") / "m")


@pytest.fixture(scope="module")
def quant_dir(model_dir) -> Path:
    from slmforge.compress.quantize import QuantizeConfig, quantize_dir

    return quantize_dir(model_dir, model_dir.parent / "q8", QuantizeConfig(bits=8))


def _copy(src: Path) -> Path:
    d = Path(tempfile.mkdtemp(prefix="fuzz-")) / src.name
    shutil.copytree(src, d)
    return d


def use(d: Path) -> str:
    """What `slmforge generate` and `chat` do with a directory: every file read and used."""
    from slmforge.infer.engine import generate_text
    from slmforge.infer.sampling import SamplingParams
    from slmforge.modeldir import ModelDir

    md = ModelDir.open(d)
    model, tok = md.load_model(), md.load_tokenizer()
    text = generate_text(model, tok, "Tom saw", SamplingParams(max_new_tokens=3, temperature=0))
    if tok.chat_template:
        tok.encode_chat([{"role": "user", "content": "hi"}])
    assert isinstance(text, str)
    return text


def _check_dir(d: Path) -> str | None:
    _, err = read_or_error(lambda: use(d), str(d))
    return err


# ------------------------------------------------------------------------------------------- JSON files

JSON_FILES = ["config.json", "slmforge.json", "tokenizer_config.json", "generation_config.json"]


@fuzz_settings(40)
@given(st.sampled_from(JSON_FILES), st.data())
@example("config.json", {"max_position_embeddings": 2**40})  # a 2**40-row RoPE table: allocated, or a hang
@example("config.json", {"num_hidden_layers": 10**9})  # a billion layers built one by one
@example("config.json", {"rms_norm_eps": float("inf")})  # every norm output 0: a silently wrong model
@example("config.json", {"rope_theta": float("inf")})
@example("config.json", {"rope_theta": 2**70})  # an OverflowError in RoPE: torch takes Python ints as int64
@example("config.json", {"rms_norm_eps": 2**70})  # and in RMSNorm
@example("slmforge.json", {"quantization": {"bits": 3, "modules": 1}})
@example("slmforge.json", {"classifier": True})  # a TypeError in predict
@example("tokenizer_config.json", [1, 2])  # AttributeError: 'list' object has no attribute 'get'
@example("tokenizer_config.json", {"bos_token": 5})  # TypeError inside tokenizers
@example("tokenizer_config.json", {"chat_template": 5})
@example("generation_config.json", [1])
@example("generation_config.json", {"eos_token_id": ["a"]})  # ValueError from int("a")
def test_model_dir_json_fields(model_dir, name, data):
    """A field of one of the directory's JSON files deleted, retyped, set to junk (NaN, inf, huge, negative)."""
    d = _copy(model_dir)
    p = d / name
    valid = json.loads(p.read_text())
    if isinstance(data, st.DataObject):
        new = data.draw(edited(valid, max_edits=3))
    else:  # an explicit example: fields to replace (or a whole value)
        new = {**valid, **data} if isinstance(data, dict) else data
    p.write_text(json.dumps(new))
    _check_dir(d)


@fuzz_settings(30)
@given(st.sampled_from([*JSON_FILES, "tokenizer.json", "chat_template.jinja"]), st.data())
@example("config.json", b"[" * 3000 + b"]" * 3000)  # RecursionError in json.loads
@example("chat_template.jinja", b"{{ bos_token }}\xff")  # not UTF-8
@example("chat_template.jinja", b"{% for %}")
def test_model_dir_file_bytes(model_dir, name, data):
    """One of the directory's text files with bytes flipped, cut, inserted; random bytes; an empty file."""
    d = _copy(model_dir)
    p = d / name
    valid = p.read_bytes() if p.is_file() else b"{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    if name == "chat_template.jinja":
        _template_from_file(d)
    p.write_bytes(data.draw(file_bytes(valid)) if isinstance(data, st.DataObject) else data)
    _check_dir(d)


@fuzz_settings(30)
@given(st.data())
@example({"model": {"type": "BPE", "vocab": {"a": 10_000_000}, "merges": []}})  # an id beyond the embedding
# two tokens with one id: tokenizers reads the file, but not what it writes back (an Exception at encode)
@example({"model": {"type": "BPE", "vocab": {"a": 10, "b": 10, "ab": 11}, "merges": [["a", "b"]]}})
def test_tokenizer_json_fields(model_dir, data):
    """tokenizer.json parsed and edited: vocab ids, merges, added tokens, normalizer and decoder fields."""
    d = _copy(model_dir)
    p = d / "tokenizer.json"
    spec = json.loads(p.read_text())
    if isinstance(data, st.DataObject):
        # the vocab and merges have hundreds of entries: edit a few of them, not only their first and last
        small = {**spec, "model": {**spec["model"], "vocab": dict(list(spec["model"]["vocab"].items())[:300]),
                                   "merges": spec["model"]["merges"][:20]}}
        new = data.draw(edited(small, max_edits=3))
    else:
        new = {**spec, **data}
    p.write_text(json.dumps(new))
    _check_dir(d)


# ------------------------------------------------------------------------------------------- safetensors


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _safetensors_join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


@fuzz_settings(30)
@given(st.data())
@example(("model.norm.weight", "dtype", "\n"))  # quoted back in safetensors' error: a message of two lines
@example(("model.norm.weight", "shape", [2**40, 2**40]))
@example(("model.norm.weight", "data_offsets", [0, -1]))
def test_safetensors_header(model_dir, data):
    """The header's dtypes, shapes and data_offsets edited (wrong, negative, huge, junk) over the same data."""
    d = _copy(model_dir)
    p = d / "model.safetensors"
    header, body = _safetensors_parts(p)
    if isinstance(data, st.DataObject):
        header = data.draw(edited(header, max_edits=2))
    else:  # an explicit example: (tensor, field, value)
        header[data[0]][data[1]] = data[2]
    p.write_bytes(_safetensors_join(header, body))
    _check_dir(d)


@fuzz_settings(20)
@given(st.data())
@example(b"\xff" * 8 + b"{}")  # a header length of 2**64 - 1
def test_safetensors_bytes(model_dir, data):
    d = _copy(model_dir)
    p = d / "model.safetensors"
    valid = p.read_bytes()
    # the header is the first few hundred bytes of ~100 KB: aim half of the edits at it
    head = valid[:1024]
    raw = (data.draw(st.one_of(file_bytes(valid), file_bytes(head).map(lambda h: h + valid[1024:])))
           if isinstance(data, st.DataObject) else data)
    p.write_bytes(raw)
    _check_dir(d)


WEIGHT_EDITS = ["drop", "transpose", "int32", "int8", "bool", "float16", "bfloat16", "float64", "nan", "inf",
                "extra", "empty", "scalar"]


@fuzz_settings(25)
@given(st.sampled_from(WEIGHT_EDITS), st.integers(0, 10**6))
@example("int32", 0)  # integers read as floats: a silently wrong model
@example("nan", 0)  # NaN logits: generate printed tokens as if nothing were wrong
@example("transpose", 476)  # o_proj is square: a transposed one cannot be told from the real one
def test_safetensors_weights(model_dir, edit, which):
    """One weight removed, transposed, of another dtype, holding NaN/inf, empty, or an extra one added."""
    import torch
    from safetensors.torch import load_file, save_file

    d = _copy(model_dir)
    p = d / "model.safetensors"
    state = load_file(str(p))
    k = sorted(state)[which % len(state)]
    v = state[k]
    if edit == "drop":
        del state[k]
    elif edit == "transpose":
        state[k] = v.T.contiguous() if v.dim() == 2 else v[:-1].contiguous()
    elif edit in ("int32", "int8", "bool", "float16", "bfloat16", "float64"):
        state[k] = v.to(getattr(torch, edit))
    elif edit in ("nan", "inf"):
        v = v.clone()
        v.view(-1)[which % v.numel()] = float(edit)
        state[k] = v
    elif edit == "extra":
        state["model.layers.99.mlp.up_proj.weight"] = v.clone()
    elif edit == "empty":
        state[k] = v.new_zeros((0,))
    else:
        state[k] = v.new_zeros(())
    save_file(state, str(p))
    err = _check_dir(d)
    square = v.dim() == 2 and v.shape[0] == v.shape[1]  # transposed, it has the shape it had: no one can tell
    if edit in ("drop", "int32", "int8", "bool", "nan", "inf", "extra", "empty", "scalar") or (
            edit == "transpose" and not square):
        assert err is not None, f"{edit} {k}: loaded without a word"


@fuzz_settings(20)
@given(st.data())
def test_quantized_weights(quant_dir, data):
    """A quantized directory's integers and scales (quantized.safetensors), and its slmforge.json entry."""
    from safetensors.torch import load_file, save_file

    d = _copy(quant_dir)
    p = d / "quantized.safetensors"
    choice = data.draw(st.sampled_from(["bytes", "drop", "retype", "meta"]))
    if choice == "bytes":
        p.write_bytes(data.draw(file_bytes(p.read_bytes())))
    elif choice == "meta":
        m = d / "slmforge.json"
        meta = json.loads(m.read_text())
        meta["quantization"] = data.draw(edited(meta["quantization"]))
        m.write_text(json.dumps(meta))
    else:
        import torch

        state = load_file(str(p))
        k = data.draw(st.sampled_from(sorted(state)))
        if choice == "drop":
            del state[k]
        else:
            state[k] = state[k].to(data.draw(st.sampled_from([torch.float32, torch.int32, torch.uint8])))
        save_file(state, str(p))
    _check_dir(d)


# ------------------------------------------------------------------------------------------------- GGUF


@fuzz_settings(15)
@given(st.sampled_from(["config.json", "slmforge.json", "model.safetensors", "tokenizer.json", "quant-meta",
                        "quantized.safetensors"]),
       st.sampled_from(["f32", "q8_0"]), st.data())
@example("quant-meta", "q8_0", {"bits": 3, "modules": 1})  # a KeyError in export_gguf
@example("quantized.safetensors", "q8_0", b"flip 64")  # a key name's byte flipped: a KeyError in export_gguf
def test_export_gguf_reads_the_directory(model_dir, quant_dir, name, gtype, data):
    """export gguf from a directory with one mutated file: a .gguf that gguf's reader opens, or an error;
    never a temp file left beside the output."""
    import gguf

    from slmforge.convert.gguf import export_gguf

    d = _copy(quant_dir if name.startswith("quant") else model_dir)
    if name == "quant-meta":
        meta = json.loads((d / "slmforge.json").read_text())
        meta["quantization"] = (data.draw(edited(meta["quantization"])) if isinstance(data, st.DataObject)
                                else {**meta["quantization"], **data})
        (d / "slmforge.json").write_text(json.dumps(meta))
    elif name.endswith(".json"):
        p = d / name
        p.write_text(json.dumps(data.draw(edited(json.loads(p.read_text())))))
    else:
        p = d / name
        raw = p.read_bytes()
        if data == b"flip 64":
            raw = raw[:64] + bytes([raw[64] ^ 1]) + raw[65:]
        p.write_bytes(data.draw(file_bytes(raw)) if isinstance(data, st.DataObject) else raw)
    out = d.parent / "out" / "m.gguf"
    path, _ = read_or_error(lambda: export_gguf(d, out, gtype), str(d))
    if path is not None:
        assert len(gguf.GGUFReader(str(path)).tensors) > 0
    leftovers = [x.name for x in out.parent.iterdir() if x.name != "m.gguf"] if out.parent.exists() else []
    assert leftovers == []


# --------------------------------------------------------------------------------------------------- CLI


def _one_error(rc: int, err: str, *needles: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 1 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


CLI_CASES = {  # file, edit: the cases the fuzzing above found, through the command line
    "huge-context": ("config.json", {"max_position_embeddings": 2**40}),
    "inf-eps": ("config.json", {"rms_norm_eps": float("inf")}),
    "deep-json": ("config.json", "[" * 3000 + "]" * 3000),
    "classifier-true": ("slmforge.json", {"classifier": True}),
    "tokenizer-config-list": ("tokenizer_config.json", [1, 2]),
    "bos-int": ("tokenizer_config.json", {"bos_token": 5}),
    "eos-ids": ("generation_config.json", {"eos_token_id": ["a"]}),
    "template-not-utf8": ("chat_template.jinja", b"\xff\xfe"),
    "tokenizer-id-too-big": ("tokenizer.json", {"model": {"type": "BPE", "vocab": {"a": 10_000_000}, "merges": []}}),
    "nan-weight": ("model.safetensors", "nan"),
    "int-weights": ("model.safetensors", "int32"),
    "header-length": ("model.safetensors", b"\xff" * 8 + b"{}"),
}


def _template_from_file(d: Path) -> None:
    """Move the chat template out of tokenizer_config.json: chat_template.jinja is read only then."""
    p = d / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg.pop("chat_template", None)
    p.write_text(json.dumps(cfg))


def apply_case(d: Path, name: str, edit) -> None:
    p = d / name
    if name == "chat_template.jinja":
        _template_from_file(d)
    if isinstance(edit, bytes):
        p.write_bytes(edit)
    elif name == "model.safetensors":
        import torch
        from safetensors.torch import load_file, save_file

        state = load_file(str(p))
        if edit == "nan":
            state["model.norm.weight"][0] = float("nan")
        else:
            state = {k: v.to(torch.int32) for k, v in state.items()}
        save_file(state, str(p))
    elif isinstance(edit, dict):
        p.write_text(json.dumps({**json.loads(p.read_text()), **edit}))
    elif isinstance(edit, str):
        p.write_text(edit)
    else:
        p.write_text(json.dumps(edit))


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_generate_names_the_file(capsys, monkeypatch, model_dir, case):
    name, edit = CLI_CASES[case]
    d = _copy(model_dir)
    apply_case(d, name, edit)
    rc, out, err = run_cli(capsys, monkeypatch, "generate", d, "Tom saw", "-n", 3)
    _one_error(rc, err, str(d))
    assert out == ""


@pytest.mark.parametrize("case", ["huge-context", "classifier-true", "nan-weight", "quant-bits"])
def test_cli_export_gguf_names_the_file(capsys, monkeypatch, model_dir, quant_dir, case):
    d = _copy(quant_dir if case == "quant-bits" else model_dir)
    if case == "quant-bits":
        meta = json.loads((d / "slmforge.json").read_text())
        meta["quantization"]["bits"] = 3
        (d / "slmforge.json").write_text(json.dumps(meta))
    else:
        apply_case(d, *CLI_CASES[case])
    out = d.parent / "m.gguf"
    rc, _, err = run_cli(capsys, monkeypatch, "export", "gguf", d, out, "--type", "q8_0")
    _one_error(rc, err, str(d))
    assert not out.exists() and not [x for x in d.parent.iterdir() if x.name.endswith(".tmp")]

