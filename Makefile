# Encore: `make run` sets everything up and runs the platform end to end; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
ENCORE := $(VENV)/bin/encore
PYTEST_ARGS ?=
# Two pytest workers, whole files each (--dist loadfile keeps a module's services in one process): most tests
# wait on real servers, so two workers shorten the suite even on two cores. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: install run test test-fast ui scaling clean bench-ingest help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install:  ## create/reuse .venv with pinned dependencies
	@bash infra/install.sh

run: install  ## run the whole road end to end on embedded services (fresh data dir)
	@$(ENCORE) run --fresh

test: install  ## the full test suite (unit + integration against real services)
	@$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: install  ## unit tests only
	@$(PY) -m pytest -m "not integration" $(XDIST) $(PYTEST_ARGS)

ui: install  ## Dagster + MLflow UIs on the local data dir
	@$(ENCORE) ui

scaling: install  ## the scaling study's short profile (2 CPU cores, under an hour; docs/scaling.md)
	@$(ENCORE) study scaling --profile short

clean:  ## stop leftover services and delete the local data dir
	-@$(ENCORE) services stop 2>/dev/null
	rm -rf .encore
