# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.forcekit-installed
# The local CPU build on the development machine; GPU users: see README "Installing on a GPU".
TORCH_PIN ?= torch==2.13.0
EXTRAS ?= dev,apps,engines,diffusers,train,lipsync

.PHONY: install run test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "note: could not install chromium (apt); the browser tests will be skipped"
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

run: $(STAMP)
	$(PY) -m forcekit run

clean:
	rm -rf $(VENV) .pytest_cache
