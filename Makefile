# The chat's entry points: `make run` (no services needed), `make lint`, `make test`,
# and `make cluster` (nginx, several workers, Redis, PostgreSQL on loopback).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 3
# SENTINEL=1 (or yes, true): `make cluster` runs Redis as a primary, a replica
# and three sentinels.
SENTINEL ?=
# apt-get needs root; use sudo when we are not.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
# Debian packages the tests start for real: command to look for, package name.
SYSTEM_PACKAGES := redis-server:redis-server redis-sentinel:redis-sentinel initdb:postgresql chromium:chromium nginx:nginx

.PHONY: venv run cluster lint unit test test-postgres system-packages clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

## run: serve the chat at http://$(HOST):$(PORT)/ with daphne (SQLite + in-memory layer)
# collectstatic: with DJANGO_DEBUG=0 the pages link the hashed names it writes.
run: venv
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput -v0
	$(PY) -m chatproject.server -b $(HOST) -p $(PORT) chatproject.asgi:application

## cluster: nginx on $(HOST):$(PORT) in front of $(WORKERS) workers (next ports), Redis, PostgreSQL; SENTINEL=1 for Redis under Sentinel
cluster: venv system-packages
	$(PY) bin/cluster --workers $(WORKERS) --host $(HOST) --port $(PORT) $(if $(filter 1 yes true,$(SENTINEL)),--sentinel)

## system-packages: install what the tests start (redis-server, redis-sentinel, PostgreSQL, Chromium, nginx)
system-packages:
	@missing=""; \
	for pair in $(SYSTEM_PACKAGES); do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/$$cmd >/dev/null 2>&1 \
	    || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

## lint: ruff's lint rules and its formatter (settings in pyproject.toml), checked, not applied
lint: venv
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

## unit: the tests that start no process (no redis-server, daphne, nginx, PostgreSQL, Chromium)
# tests/integration and tests/browser start them; tests/conftest.py marks `redis` the
# tests in tests/test_*.py that start a redis-server.
unit: venv
	$(PY) -m pytest -m "not redis" tests/test_*.py

## test: the whole suite on SQLite, then the database-heavy tests on PostgreSQL
test: venv system-packages
	$(PY) -m pytest
	$(MAKE) test-postgres

test-postgres: venv system-packages
	bin/with-postgres $(PY) -m pytest -p no:cacheprovider \
	  tests/test_consumers.py tests/test_services.py tests/test_presence.py \
	  tests/test_api.py tests/test_openapi.py tests/test_tokens.py \
	  tests/test_commands.py tests/test_admin.py

## bench: the chat against the Channels tutorial's consumer (docs/performance.md); BENCH_ARGS="--rounds 1 --scale 0.2"
.PHONY: bench
bench: venv system-packages
	$(PY) -m bench $(BENCH_ARGS)

## soak: the cluster under load, churn and rolling restarts (bench/soak.py, docs/reliability.md); SOAK_ARGS="--clients 200 --seconds 300"
.PHONY: soak
soak: venv system-packages
	$(PY) -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) staticfiles db.sqlite3
