#!/usr/bin/env bash
# Build llama-cpp-python (llama.cpp's Python binding) into the project venv, for the llama.cpp comparison
# in benchmarks/decode_speed.py and the llama.cpp checks in tests/test_gguf.py (which skip without it).
#
# A source build from PyPI, CPU only, tuned to this machine's CPU (-DGGML_NATIVE=ON, as a llama.cpp user
# would build it), without the multimodal library. It is not part of `make test`: it takes a while
# (6 min 53 s on the 2 shared development cores at nice 19). Settings: PYTHON, LLAMA_CPP_VERSION, NICE, CMAKE_ARGS,
# CMAKE_BUILD_PARALLEL_LEVEL.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
VERSION="${LLAMA_CPP_VERSION:-0.3.36}"

if "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    echo "llama-cpp-python $VERSION is already installed"
    exit 0
fi
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DLLAVA_BUILD=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
time nice -n "${NICE:-19}" "$PY" -m pip install --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
