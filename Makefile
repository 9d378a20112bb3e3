# The two set-up commands of the README. Both are idempotent, and say what they install as they do.
VENV ?= .venv
PYTHON ?= python3

.PHONY: run test fault bench simulation simulate

# Install and run the embedded default: in-memory broker, SQLite, http://127.0.0.1:8000.
run:
	@echo "make run: installing Conveyor and the example's packages into $(VENV) (python -m venv; pip install -e .)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e .
	@echo "make run: the conveyor command is in $(VENV)/bin: in another terminal, run '. $(VENV)/bin/activate'" \
		"in this directory, then e.g. 'conveyor sagas list' (or type $(VENV)/bin/conveyor)"
	$(VENV)/bin/conveyor run

# Install everything, start the local services (PostgreSQL, RabbitMQ, NATS) that are not running, run the test suite.
# A service that runs but is unhealthy is not restarted: the start script fails naming it and the fix.
test:
	@echo "make test: installing Conveyor with its test tools into $(VENV) (python -m venv; pip install -e '.[dev]')"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# The console's browser tests drive Debian's Chromium; installed once, when missing.
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
		echo "make test: installing Chromium and chromedriver for the console's browser tests (apt-get install chromium chromium-driver)"; \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }
	bash compose/start-local-services.sh
	@# Four test processes (most tests wait on brokers and subprocesses, not on a core); each has its own
	@# databases, broker names and servers. The few tests that stop a shared service run alone afterwards.
	$(VENV)/bin/python -m pytest -m "not fault and not simulation and not serial" -n 4 --durations=25
	$(VENV)/bin/python -m pytest -m "serial"

# The fault tier (tests/fault: real processes, crashes and outages, a table of figures); after `make test`.
fault:
	bash compose/start-local-services.sh
	$(VENV)/bin/python -m pytest -m fault

# The seeded fault simulation's CI set (tests/simulation: fixed seeds, every broken variant caught); after `make test`.
simulation:
	$(VENV)/bin/python -m pytest -m simulation

# The seeded fault simulation (tests/simulation): seeds 0..SEEDS-1 under virtual time; each failing seed
# prints the one-line command that replays it. PROFILE=ci leaves out the faults today's runtime is known to fail.
SEEDS ?= 1000
PROFILE ?= full
simulate:
	$(VENV)/bin/python -m tests.simulation --seeds $(SEEDS) --profile $(PROFILE)

# Every performance row, Conveyor and the raw client interleaved (see README "Performance"); not a test.
# It starts nothing: it checks the services `make test` started, and fails naming any that is not healthy.
bench:
	bash compose/start-local-services.sh --check
	$(VENV)/bin/python -m bench --runs 3
