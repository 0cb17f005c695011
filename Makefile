# contact360-worker: `make run` starts the workers, `make test` runs the suite (see README).
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv run test lint format bench bench-import bench-import-pooler bench-export bench-email \
	bench-email-batch bench-recycling bench-recovery bench-console bench-fairness services chaos

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## Run the workers for all three queues (cron included) in the foreground until Ctrl-C.
## Email goes to the console provider (logged, never sent) unless EMAIL_PROVIDER says otherwise.
run: venv
	scripts/services.sh run
	$(PY) -m worker migrate
	EMAIL_PROVIDER="$${EMAIL_PROVIDER:-console}" $(PY) -m worker run  # logs email, sends none

## The whole suite against real PostgreSQL and Redis (installed and started if missing).
## Two pytest-xdist workers, one per core: each has its own PostgreSQL database and takes the
## Redis database below the previous one's (TEST_REDIS_DB, default 15, then 14).
## TEST_ARGS="-n 0" runs the suite in one process.
TEST_ARGS ?= -n 2
test: venv
	scripts/services.sh test
	$(PY) -m pytest $(TEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy worker jobs db examples tests

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

services:
	scripts/services.sh test

bench: bench-import bench-export bench-email bench-email-batch bench-recovery bench-console \
	bench-fairness

bench-import: venv services
	$(PY) bench/bench_import.py

bench-import-pooler: venv services
	$(PY) bench/bench_import_pooler.py

bench-export: venv services
	$(PY) bench/bench_export.py

bench-email: venv services
	$(PY) -m pip install -q -e '.[dev,bench]'  # Celery, for the prefork baseline
	$(PY) bench/bench_email.py

## Recycling at the default settings against recycling off, in bench-email's setup (~8 min).
bench-recycling: venv services
	$(PY) bench/bench_email.py --recycling

bench-recovery: venv services
	$(PY) bench/bench_recovery.py

## Batches against a fake Resend enforcing its documented 5 requests/s (README "Email guarantees").
bench-email-batch: venv services
	$(PY) bench/bench_email_batch.py

## The console under a backlog of 10^5 jobs and outbox rows: latency, and 50 polling dashboards.
bench-console: venv services
	$(PY) bench/bench_console.py

## User B's small import behind user A's burst of 10 large ones, with and without the per-user cap.
bench-fairness: venv services
	$(PY) bench/bench_fairness.py

## The chaos soak (outside `make test`, <= 10 min): mixed workload, random faults, invariants.
## Smaller while developing: make chaos CHAOS_ARGS="--duration-s 90 --scale 0.05"
CHAOS_ARGS ?=
chaos: venv services
	$(PY) -m bench.chaos $(CHAOS_ARGS)
