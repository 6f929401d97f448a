# stainbridge: `make demo` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install only when pyproject.toml changes (or the venv is new).
STAMP := $(VENV)/.installed

.PHONY: all demo test venv clean-venv

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

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/stainbridge demo

clean-venv:
	rm -rf $(VENV)
