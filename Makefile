# Two commands on a fresh machine: `make demo` and `make test`. Both install what the project needs first: into the
# active virtual environment, or else into .venv (created with access to the packages already installed, so that
# what is there is reused). A second run reinstalls only when a requirements file changed.
PYTHON ?= python3
VENV ?= .venv
# Test processes (pytest-xdist): one per core by default; `make test TEST_WORKERS=0` runs in one process.
TEST_WORKERS ?= auto
ifdef VIRTUAL_ENV
ENV_DIR := $(VIRTUAL_ENV)
PY := python
else
ENV_DIR := $(VENV)
PY := $(VENV)/bin/python
endif
STAMP := $(ENV_DIR)/.omegadit-installed

.PHONY: install demo test

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
ifndef VIRTUAL_ENV
	$(PYTHON) -m venv --system-site-packages $(VENV)
endif
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

demo: install
	$(PY) -m demo.run --preset cpu

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests
