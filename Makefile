# Two commands for a fresh clone: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JAX_PLATFORMS ?= cpu
export PYTHONWARNINGS ?= ignore::DeprecationWarning:tensorflow_datasets

.PHONY: demo test install clean

$(STAMP): setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q -e ".[test,torch,tpu]" 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import vlm_jax, jax, flax, torch, transformers, libtpu" && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vlm-jax demo --workdir runs/demo

# Two pytest workers (pytest-xdist), one test file each at a time: compiling is mostly one thread, so the
# second core runs the other file's compiles. On the 2-core Intel machine with a cold compilation cache the suite
# took 597 s this way and ~840 s in one process. On the AMD machine of session 12, 353 tests took 786 s cold and
# 385 s warm; of those, libtpu's two large TPU compiles (tests/test_aot.py) alone take 316 s, cache or not.
# `make test` in a fresh clone with a cold cache: 13.9 min, the venv install from pip's cache (80 s) included.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) runs
