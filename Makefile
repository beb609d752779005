# Two commands for a fresh clone: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JAX_PLATFORMS ?= cpu
export PYTHONWARNINGS ?= ignore::DeprecationWarning:tensorflow_datasets

.PHONY: demo test install clean browser

$(STAMP): setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q -e ".[test,torch,tpu,serve]" 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import vlm_jax, jax, flax, torch, transformers, libtpu" && touch $(STAMP)

install: $(STAMP) browser

# The chat page's test (tests/test_serve_page.py) drives Debian's chromium: installed here when it is missing and
# we are root (CI on a clean machine); otherwise install chromium and chromium-driver yourself.
browser:
	@if ! command -v chromedriver >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; fi

demo: $(STAMP)
	$(VENV)/bin/vlm-jax demo --workdir runs/demo

# Two pytest workers (pytest-xdist), one test file each at a time: compiling is mostly one thread, so the
# second core runs the other file's compiles. Suite times: docs/performance.md.
test: $(STAMP) browser
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) runs
