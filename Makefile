# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test lint bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# Pin the CPU torch wheel first so nothing pulls a multi-GB CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) -e '.[dev]'
	touch $@

# With llama2.c's stories260K in ../shared/data the demo's stories are sampled from it (a teacher, as
# TinyStories' authors used GPT-3.5/4); without it, from the offline template generator.
TS := ../shared/data/tinystories
demo: $(VENV)/.base
	if [ -f $(TS)/stories260K.bin ]; then \
	  [ -f runs/stories260K/model.safetensors ] || $(VENV)/bin/slmforge import llama2c $(TS)/stories260K.bin $(TS)/tok512.bin runs/stories260K; \
	  $(VENV)/bin/slmforge quickstart --out runs/quickstart --teacher runs/stories260K --stories 3000 --vocab-size 1024 \
	    --minutes 5 --judge-text $(TS)/tinystories_valid_part1.txt --reference runs/stories260K; \
	else \
	  $(VENV)/bin/slmforge quickstart --out runs/quickstart; \
	fi

test: $(VENV)/.dev
	$(PY) -m pytest

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check slmforge tests benchmarks

bench: $(VENV)/.base
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs build *.egg-info
