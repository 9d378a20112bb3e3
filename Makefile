# The two set-up commands of the README. Both are idempotent.
VENV ?= .venv
PYTHON ?= python3

.PHONY: run test fault

# Install and run the embedded default: in-memory broker, SQLite, http://127.0.0.1:8000.
run:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e .
	$(VENV)/bin/conveyor run

# Install everything, start the local services (PostgreSQL, RabbitMQ, NATS), run the test suite.
test:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	bash compose/start-local-services.sh
	$(VENV)/bin/python -m pytest -m "not fault"

# The fault tier (tests/fault: real processes, crashes and outages, a table of figures); after `make test`.
fault:
	bash compose/start-local-services.sh
	$(VENV)/bin/python -m pytest -m fault
