# The two commands a newcomer needs: `make demo` and `make test`. Each sets up first.
.DEFAULT_GOAL := help
PY := .venv/bin/python
PYTEST_ARGS ?=
# make demo HTTP_PORT=8790 MQTT_PORT=8893: the sandbox's ports (default 8780 and 8883, or
# free ones when those are in use).
HTTP_PORT ?=
MQTT_PORT ?=
DEMO_ARGS ?=
DEMO_OPTIONS = $(strip $(if $(HTTP_PORT),--http-port $(HTTP_PORT)) \
  $(if $(MQTT_PORT),--mqtt-port $(MQTT_PORT)) $(DEMO_ARGS))
# The Pythons whose unit tests `make test` also runs, where found (empty: none).
PYTHONS ?= 3.10 3.11 3.12 3.13

.PHONY: help setup setup-browser demo test unit test-pythons lint format typecheck bench licenses clean

help:
	@echo "make demo   run the whole story on a local sandbox of the platform"
	@echo "make test   lint, type-check and run every test (unit and integration);"
	@echo "            then the unit tests under each other Python 3.10-3.13 found"
	@echo "make bench  run the benchmarks; figures in bench/results.json"
	@echo "make reliability  soak the fault scenarios and security checks; writes docs/reliability.md"
	@echo "make lint   ruff and mypy"

setup:
	@scripts/setup.sh

setup-browser:
	@scripts/setup.sh --browser

demo: setup
	.venv/bin/iotref demo $(DEMO_OPTIONS)

test: setup-browser lint
	$(PY) -m pytest $(PYTEST_ARGS)
	$(if $(strip $(PYTHONS)),scripts/test-pythons.sh $(PYTHONS))

test-pythons: setup
	scripts/test-pythons.sh $(PYTHONS)

unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check src tests bench
	.venv/bin/ruff format --check src tests bench
	.venv/bin/mypy

format: setup
	.venv/bin/ruff format src tests bench
	.venv/bin/ruff check --fix src tests bench

bench: setup
	$(PY) -m bench $(BENCH)
	$(PY) -m bench.report

reliability: setup
	$(PY) -m tests.reliability.report $(RELIABILITY_ARGS)

clean:
	rm -rf .venv .venv-3.* .tools .mypy_cache .ruff_cache .pytest_cache tests/mermaid/node_modules

licenses: setup
	scripts/licenses.sh
