# papertag: `make run` serves, `make test` runs the whole suite. Both install what they need (idempotent).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
export PORT

# Installs are keyed on the requirement files' content, so editing a pin reinstalls and nothing else does.
SERVE_STAMP := $(VENV)/.installed-serve-$(shell cat requirements.txt | sha256sum | cut -c1-16)
DEV_STAMP := $(VENV)/.installed-dev-$(shell cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)

.PHONY: run test lint install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(SERVE_STAMP): requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(DEV_STAMP): requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(SERVE_STAMP)

# Migrate, import the shipped default bundles on first start, then serve on 127.0.0.1:$(PORT).
run: $(SERVE_STAMP)
	$(BIN)/flask --app wsgi db upgrade
	$(BIN)/flask --app wsgi models import-defaults
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

test: $(DEV_STAMP)
	$(BIN)/python -m pytest

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

# train: the trainer's target (its install step and CONFIG/OUT handling) is added with trainer/.
