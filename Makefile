# Renderhive: `make demo` runs the farm end to end, `make test` runs the whole suite.
# The virtual environment is reused as long as pyproject.toml is unchanged (bpy alone is ~1 GB).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: install demo test bench addon browser anvil postgres sandbox clean

install: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: install sandbox
	$(BIN)/python -m client.demo $(DEMO_ARGS)

test: install browser anvil postgres sandbox
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Debian's Chromium for the browser tests (Playwright drives it; no browser download). Installed only
# when missing; needs root or sudo, as apt does.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

# Debian's PostgreSQL server for the tests that run on both databases: tests/pg.py starts a throwaway
# cluster in a temporary directory on a loopback port (as the package's unprivileged `postgres` account
# when run as root) and stops it at the end. Installed only when missing (PG_BINDIR names another
# server's bin folder); needs root or sudo, as apt does.
postgres:
	@[ -n "$$PG_BINDIR" ] || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql; }

# bubblewrap (Debian's `bubblewrap`, what Flatpak uses) for the worker's OS sandbox of runtime children
# (worker/sandbox.py). Installed only when missing; needs root or sudo, as apt does.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq bubblewrap; }

# anvil (Foundry's dev EVM node) for the payment tests: the npm package's binary, installed into .tools/
# (ignored by git) only when missing. ANVIL=/path/to/anvil overrides it for the tests.
ANVIL_BIN := .tools/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil
anvil: $(ANVIL_BIN)

$(ANVIL_BIN):
	npm install --prefix .tools --no-save --no-audit --no-fund --loglevel=error @foundry-rs/anvil-linux-amd64
	@test -x $@

bench: install
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/dispatch.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/diffusion.py
	$(BIN)/python bench/gas.py
	$(BIN)/python bench/verify.py
	$(BIN)/python bench/tiles.py
	$(BIN)/python bench/sandbox.py
	$(BIN)/python bench/hostile.py

# The Blender extension zip (client/blender_addon + a copy of client/api.py), built offline by
# Blender's own extension builder: install it with Edit > Preferences > Get Extensions > Install from Disk.
ADDON_OUT ?= dist
addon: install
	$(BIN)/python -m client.build_addon --out $(ADDON_OUT)

clean:
	rm -rf $(VENV) .demo build *.egg-info
