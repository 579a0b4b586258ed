# Written by `python -m loadtests.options --makefile > loadtests/options.mk` from the table in
# loadtests/options.py: edit that, not this (tests/harness/test_load_options.py checks it).
# make load NAME=value passes --name value; empty: the option's default
# (python -m loadtests.run --help). A variable the Makefile declares with a value
# before including this file (WORKERS) keeps it.

USERS ?=
DURATION ?=
ROOMS ?=
POSTERS ?=
BURST_SIZE ?=
BURST_GAP ?=
SEED ?=
POLL_TIMEOUT ?=
SPAWN_RATE ?=
STOP_RATE ?=
LOST_CONTACT_SECONDS ?=
SHAPE ?=
STEP ?=
SLO ?=
WORKERS ?=
HOST ?=
REDIS_CLUSTER ?=
REDIS_WAIT ?=
CHAOS ?=
PROXY ?=
TLS ?=
CA_FILE ?=
CLIENT_PROCESSES ?=
REMOTE_WORKERS ?=
MASTER_BIND ?=
MASTER_PORT ?=
WORKER_WAIT ?=
UI ?=
REPORT_ROOT ?=
BASE ?=
ROUNDS ?=
MAX_ROUNDS ?=
TIME_LIMIT ?=
ORDER_SEED ?=
CANARY_THRESHOLD ?=
RETRIES ?=
ALLOW_DIRTY ?=
SUMMARY ?=

LOAD_ARGS = $(strip \
  $(if $(USERS),--users $(USERS)) \
  $(if $(DURATION),--duration $(DURATION)) \
  $(if $(ROOMS),--rooms $(ROOMS)) \
  $(if $(POSTERS),--posters $(POSTERS)) \
  $(if $(BURST_SIZE),--burst-size $(BURST_SIZE)) \
  $(if $(BURST_GAP),--burst-gap $(BURST_GAP)) \
  $(if $(SEED),--seed $(SEED)) \
  $(if $(POLL_TIMEOUT),--poll-timeout $(POLL_TIMEOUT)) \
  $(if $(SPAWN_RATE),--spawn-rate $(SPAWN_RATE)) \
  $(if $(STOP_RATE),--stop-rate $(STOP_RATE)) \
  $(if $(LOST_CONTACT_SECONDS),--lost-contact-seconds $(LOST_CONTACT_SECONDS)) \
  $(if $(SHAPE),--shape $(SHAPE)) \
  $(if $(STEP),--step $(STEP)) \
  $(if $(SLO),--slo $(SLO)) \
  $(if $(WORKERS),--workers $(WORKERS)) \
  $(if $(HOST),--host $(HOST)) \
  $(if $(REDIS_CLUSTER),--redis-cluster $(REDIS_CLUSTER)) \
  $(if $(REDIS_WAIT),--redis-wait $(REDIS_WAIT)) \
  $(if $(CHAOS),--chaos $(CHAOS)) \
  $(if $(PROXY),--proxy $(PROXY)) \
  $(if $(TLS),--tls) \
  $(if $(CA_FILE),--ca-file $(CA_FILE)) \
  $(if $(CLIENT_PROCESSES),--client-processes $(CLIENT_PROCESSES)) \
  $(if $(REMOTE_WORKERS),--remote-workers $(REMOTE_WORKERS)) \
  $(if $(MASTER_BIND),--master-bind $(MASTER_BIND)) \
  $(if $(MASTER_PORT),--master-port $(MASTER_PORT)) \
  $(if $(WORKER_WAIT),--worker-wait $(WORKER_WAIT)) \
  $(if $(UI),--ui) \
  $(if $(REPORT_ROOT),--report-root $(REPORT_ROOT)) \
  $(if $(BASE),--base $(BASE)) \
  $(if $(ROUNDS),--rounds $(ROUNDS)) \
  $(if $(MAX_ROUNDS),--max-rounds $(MAX_ROUNDS)) \
  $(if $(TIME_LIMIT),--time-limit $(TIME_LIMIT)) \
  $(if $(ORDER_SEED),--order-seed $(ORDER_SEED)) \
  $(if $(CANARY_THRESHOLD),--canary-threshold $(CANARY_THRESHOLD)) \
  $(if $(RETRIES),--retries $(RETRIES)) \
  $(if $(ALLOW_DIRTY),--allow-dirty) \
  $(if $(SUMMARY),--summary $(SUMMARY)))
