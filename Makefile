# stainbridge: `make demo` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install only when pyproject.toml changes (or the venv is new).
STAMP := $(VENV)/.installed

.PHONY: all demo test test-fast venv clean-venv

all: test

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: this machine holds a local copy of these wheels (about 90 s).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

# Two test processes: run one after another, the suite kept one of two cores busy (load ~1.0: most tests wait on a
# service subprocess). --dist loadfile keeps each file on one process, so a module's fixtures are built once.
# TEST_WORKERS=0 runs it in one process. --durations: CI's log says where the suite's minutes go.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile
test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) --durations=40

# The unit tests and the quick service tests (under 3 minutes on 2 cores): every test that needs PostgreSQL,
# Chromium or a GPU, or takes more than about 10 s, carries a marker and is left out here.
FAST := not slow and not postgres and not browser and not cuda and not burst
test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "$(FAST)"

demo: $(STAMP)
	$(VENV)/bin/stainbridge demo

clean-venv:
	rm -rf $(VENV)
