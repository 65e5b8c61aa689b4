# ovmf-mh: the two entry points of the README. Both are idempotent and
# install what they need (Debian packages, EDK2 source, .venv, firmware).

VENV := .venv/bin
BOOT_WORK := work/demo

.PHONY: demo test setup lint

setup:
	bash stuart/bootstrap.sh

demo: setup
	$(VENV)/ovmf-mh build
	$(VENV)/ovmf-mh boot --mode normal --work-dir $(BOOT_WORK)/normal --timeout 120
	$(VENV)/ovmf-mh boot --mode helper --work-dir $(BOOT_WORK)/helper --timeout 60
	$(VENV)/ovmf-mh migrate --work-dir $(BOOT_WORK)/migrate

lint: setup
	$(VENV)/ruff check helper host_shim stuart tests
	$(VENV)/mypy

test: setup
	$(VENV)/ovmf-mh build --quiet
	$(VENV)/ruff check helper host_shim stuart tests
	$(VENV)/mypy
	$(VENV)/pytest -ra --durations=10
