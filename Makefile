# Chattle: a target first installs the Debian packages it needs (system-packages), then
# builds the virtualenv when pyproject.toml is newer than it.
PYTHON3 ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

BIND    ?= 127.0.0.1
PORT    ?= 8080
WORKERS ?= 1
REDIS   ?=
REDIS_CLUSTER ?=
QUICK   ?=
MONITOR ?=
TRACE   ?=
# make load's options, each a variable named after its flag (USERS= is --users): declared,
# with LOAD_ARGS, in loadtests/options.mk, which loadtests/options.py writes from its table
# (python -m loadtests.run --help lists them with their defaults). Among them: SHAPE=steps,
# listeners in steps of STEP up to USERS, one burst each, ending at the first step whose p99
# breaks SLO ms or whose delivery is incomplete; REMOTE_WORKERS, Locust workers started
# elsewhere with `make load-worker MASTER=<this host> [PROCESSES=n]`, the master listening
# on MASTER_BIND; REDIS_CLUSTER=local, a Redis Cluster started for the run, REDIS_WAIT=ms the
# server's --redis-wait (docs/cluster.md); CHAOS=<fault>[,<fault>...], a fault injected
# mid-burst, CHAOS=all the matrix, each fault its own run, one table: `make load CHAOS=all
# USERS=2000 WORKERS=2` took 14 min 17 s on 2 cores (docs/faults.md); BASE=<git rev>, that
# revision's server against this tree's, ROUNDS runs each (loadtests/compare.py).
include loadtests/options.mk
MASTER  ?=
PROCESSES ?=
CALIBRATION_ROUNDS ?=
LOCK    ?=

.PHONY: all venv system-packages lint run redis-cluster test test-long test-fast load load-calibrate load-worker history cluster-demo bench capacity regress regress-accept benchmarks soak results clean

all: test

# The Debian packages the goals given need (redis-server for the tests, the sweep and more
# than one worker; chromium for the page's test), decided by harness/system_packages.py's
# GOALS from the goals and the variables given. It installs the missing ones (apt-get as
# root, else `sudo -n apt-get`, never a prompt) or stops at once with one line naming the
# command to run. It runs before the venv, on the system's python3.
system-packages:
	@$(PYTHON3) -m harness.system_packages --for-goals "$(or $(MAKECMDGOALS),all)" --workers "$(WORKERS)" \
	  --redis "$(REDIS)" --redis-cluster "$(REDIS_CLUSTER)" --host "$(HOST)" --monitor "$(MONITOR)" \
	  --peers "$(PEERS)" --proxy "$(PROXY)"

# setup.py builds loadtests/_heldfast.c in place (the load worker's compiled path)
$(STAMP): pyproject.toml setup.py loadtests/_heldfast.c
	$(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[harness]'
	touch $(STAMP)

venv: $(STAMP)

# One worker: python chattle.py, in-memory bus.  WORKERS=N: gunicorn with N gevent
# workers on the shared Redis bus (REDIS=url, or a local redis-server started for it).
# MONITOR=1: a Prometheus scraping its /metrics every second too (docs/deploy.md, "Metrics").
# PROXY=nginx: nginx on PORT in front of it (harness/proxy.py), TLS=1 ending TLS there.
run: system-packages $(STAMP)
	$(PY) -m harness.run_server --bind $(BIND) --port $(PORT) --workers $(WORKERS) $(if $(REDIS),--redis $(REDIS)) \
	  $(if $(REDIS_CLUSTER),--redis-cluster $(REDIS_CLUSTER)) $(if $(filter-out 0,$(MONITOR)),--monitor) \
	  $(if $(PROXY),--proxy $(PROXY)) $(if $(TLS),--tls)

# A local Redis Cluster (3 masters, 3 replicas, loopback ports) until Ctrl-C; it prints the
# `make run ... REDIS_CLUSTER=` that uses it (docs/cluster.md).
redis-cluster: system-packages $(STAMP)
	$(PY) -m harness.redis_cluster

# ruff, and actionlint on the CI workflows (.github/actionlint.yaml names the self-hosted
# runners' labels); shellcheck and pyflakes inside actionlint are off so that every machine
# gives the same answer whether or not they are installed
lint: $(STAMP)
	$(PY) -m ruff check .
	$(VENV)/bin/actionlint -config-file=.github/actionlint.yaml -shellcheck= -pyflakes= .github/workflows/*.yml

# --durations: the slowest tests, which docs/results.md's make test entry lists (harness/ci_timing.py)
test: system-packages lint
	$(PY) -m pytest -m "not long" --durations=10 tests

# What make test leaves out for time: whole harness commands run several times over.
test-long: system-packages $(STAMP)
	$(PY) -m pytest -m long tests

# The inner loop: everything but the tests marked slow (the page, scale, the pipeline).
test-fast: system-packages $(STAMP)
	$(PY) -m pytest -m "not slow" tests

load: system-packages $(STAMP)
	$(PY) -m loadtests.run $(LOAD_ARGS)

# How often make load BASE= is wrong on this machine: this tree against itself and against
# itself slowed by 5, 10 and 20 % CPU and in latency alone, CALIBRATION_ROUNDS rounds (or
# TIME_LIMIT seconds), into reports/calibration.json, which every later verdict here quotes;
# LOCK=<file> is taken per round (loadtests/calibrate.py; docs/compare.md).
load-calibrate: system-packages $(STAMP)
	$(PY) -m loadtests.calibrate $(LOAD_ARGS) $(if $(CALIBRATION_ROUNDS),--calibration-rounds $(CALIBRATION_ROUNDS)) \
		$(if $(LOCK),--lock $(LOCK))

# Trend charts of reports/history.jsonl (every make load appends a line), the commits where a figure
# shifted marked (change points by Apache Otava; docs/compare.md, "History").
history: $(STAMP)
	$(PY) -m loadtests.history

# On each load host: Locust workers (one per core, or PROCESSES=n) for the master on MASTER.
load-worker: $(STAMP)
	@test -n "$(MASTER)" || { echo "load-worker: give MASTER=<address of the host running make load>" >&2; exit 2; }
	$(PY) -m loadtests.worker --master $(MASTER) $(if $(PROCESSES),--processes $(PROCESSES))

# Three hosts made of network namespaces on this machine (root: ip and faketime), a run
# across them, its report in reports/: see docs/deploy.md, "Several hosts".
cluster-demo: system-packages $(STAMP)
	$(PY) -m loadtests.cluster_demo $(if $(USERS),--users $(USERS)) $(if $(DURATION),--duration $(DURATION))

# REDIS_CLUSTER=local (a cluster started for the run) or host:port[,...]: the buses side by side
# at 5k and 10k polls, 2 workers (docs/cluster.md); PEERS= the reference servers beside Chattle,
# as make capacity takes it (default uvloop,asyncio; nchan: nginx with Nchan; 1: all; 0: none)
bench: system-packages $(STAMP)
	$(PY) -m bench.sweep $(if $(QUICK),--quick) $(if $(REDIS_CLUSTER),--redis-cluster $(REDIS_CLUSTER)) \
	  $(if $(PEERS),--peers $(PEERS))

# The largest held-poll count each server wakes within SLO ms at p99, every message delivered:
# WORKERS=1,2,4 (given on the command line; else all three), PEERS=1 every peer: both aiohttp
# references and nginx with Nchan (0: none, or a list of uvloop, asyncio, nchan), SLOWED=<squares> one worker slowed (0: not), START, MAX_POLLS,
# MAX_PROBES (per server), TIME_LIMIT (seconds, the whole run). Report in reports/<ts>-capacity/.
SLO     ?=
PEERS   ?=
SLOWED  ?=
START   ?=
MAX_POLLS ?=
MAX_PROBES ?=
# TIME_LIMIT: declared with make load's options (loadtests/options.mk), the same meaning: seconds for the whole run
CAPACITY_ARGS = $(strip $(if $(filter command line environment,$(origin WORKERS)),--workers $(WORKERS)) \
  $(if $(PEERS),--peers $(PEERS)) \
  $(if $(SLOWED),--slowed $(SLOWED)) $(if $(SLO),--slo-ms $(SLO)) $(if $(START),--start $(START)) \
  $(if $(MAX_POLLS),--max-polls $(MAX_POLLS)) $(if $(MAX_PROBES),--max-probes $(MAX_PROBES)) \
  $(if $(TIME_LIMIT),--time-limit $(TIME_LIMIT)))

capacity: system-packages $(STAMP)
	$(PY) -m bench.capacity $(CAPACITY_ARGS)

# Instruction counts under callgrind against the committed bench/baselines/callgrind.json;
# BASE=<git rev>: that revision and this tree timed side by side instead.
regress: system-packages $(STAMP)
	$(PY) -m bench.regress $(if $(BASE),--base $(BASE))

# Rewrites bench/baselines/callgrind.json from this tree, on purpose: commit it with the change.
regress-accept: system-packages $(STAMP)
	$(PY) -m bench.regress --accept

# pytest-benchmark's tables of the broadcast path (bench/benchmarks/: a fan-out in process
# and over sockets, about 10 s) and the A/B gate run for real on this tree against itself
# with more work per answer (minutes). They time on the wall clock, so they are not in
# make test: run them on a quiet machine.
benchmarks: $(STAMP)
	$(PY) -m pytest bench/benchmarks

# Hours of steady load with churn, every process's memory, descriptors, greenlets and rooms
# judged by their slope (docs/soak.md): DURATION= (default 2h), QUICK=1 (about 7 minutes),
# WORKERS=2 (gunicorn on a redis-server of its own), TRACE=1 (tracemalloc's growing sites).
soak: system-packages $(STAMP)
	$(PY) -m bench.soak $(if $(QUICK),--quick) $(if $(DURATION),--duration $(DURATION)) \
	  $(if $(filter-out 1,$(WORKERS)),--workers $(WORKERS)) $(if $(TRACE),--trace)

# docs/results.md's generated blocks, each made again in place from its run's JSON in docs/runs/
# (the convention: results/__init__.py); tests/test_docs.py fails when a block is not its render.
results: $(STAMP)
	$(PY) -m results.make

# Build products only: every baseline stays (the committed one in bench/baselines/,
# pytest-benchmark's in .benchmarks/), and so does reports/.
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info build loadtests/_heldfast*.so loadtests/_usercount*.so
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
