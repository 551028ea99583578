# Renderhive: `make demo` runs the farm end to end, `make test` runs the whole suite.
# The virtual environment is reused as long as pyproject.toml is unchanged (bpy alone is ~1 GB).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: install
	$(BIN)/python -m client.demo

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/dispatch.py

clean:
	rm -rf $(VENV) .demo build *.egg-info
