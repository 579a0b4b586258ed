# Chattle: every target builds the virtualenv first when pyproject.toml is newer than it.
PYTHON3 ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

PORT    ?= 8080
WORKERS ?= 1
REDIS   ?=
USERS   ?=
DURATION ?=
ROOMS   ?=
HOST    ?=
QUICK   ?=

.PHONY: all venv run test load bench regress regress-accept clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[harness]'
	touch $(STAMP)

venv: $(STAMP)

# One worker: python chattle.py, in-memory bus.  WORKERS=N: gunicorn with N gevent
# workers on the shared Redis bus (REDIS=url, or a local redis-server started for it).
run: $(STAMP)
	$(PY) -m bench.run_server --port $(PORT) --workers $(WORKERS) $(if $(REDIS),--redis $(REDIS))

test: $(STAMP)
	$(PY) -m pytest tests

load: $(STAMP)
	$(PY) -m loadtests.run $(if $(USERS),--users $(USERS)) $(if $(DURATION),--duration $(DURATION)) \
	  $(if $(ROOMS),--rooms $(ROOMS)) $(if $(filter-out 1,$(WORKERS)),--workers $(WORKERS)) \
	  $(if $(HOST),--host $(HOST))

bench: $(STAMP)
	$(PY) -m bench.sweep $(if $(QUICK),--quick)

# Instruction counts under callgrind against the committed bench/baselines/callgrind.json;
# BASE=<git rev>: that revision and this tree timed side by side instead.
regress: $(STAMP)
	$(PY) -m bench.regress $(if $(BASE),--base $(BASE))

# Rewrites bench/baselines/callgrind.json from this tree, on purpose: commit it with the change.
regress-accept: $(STAMP)
	$(PY) -m bench.regress --accept

# Keeps every baseline: the committed one in bench/baselines/, pytest-benchmark's in .benchmarks/.
clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
