#!/usr/bin/env bash
# The input fuzzing suite (issue 16: tests/test_fuzz_*.py, helpers in tests/input_fuzz.py) run longer than
# `make test` runs it: SLMFORGE_FUZZ=long gives every property 25x its examples, drawn at random (the normal
# suite draws the same few each time, so that it cannot fail by chance); SLMFORGE_FUZZ=<n> gives n times.
#
#   benchmarks/fuzz_long.sh                    # 25x, random: about 15 minutes on 2 cores
#   SLMFORGE_FUZZ=100 benchmarks/fuzz_long.sh -k safetensors -x
#
# A failure prints the input hypothesis shrank it to: fix the reader to raise a SlmforgeError naming the file,
# and add that input to the test as an @example, so the normal suite keeps checking it.
set -euo pipefail
cd "$(dirname "$0")/.."
export SLMFORGE_FUZZ="${SLMFORGE_FUZZ:-long}"
exec nice -n "${NICE:-10}" "${PYTHON:-.venv/bin/python}" -m pytest tests/test_fuzz_data.py tests/test_fuzz_models.py \
    tests/test_fuzz_configs.py tests/test_fuzz_inputs.py -p no:cacheprovider --tb=short "$@"
