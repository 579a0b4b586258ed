"""Gunicorn settings for Chattle, sized for long-polls; read from the working directory
by the seed's command:

    gunicorn --bind 0.0.0.0:8080 --worker-class gevent --workers 1 chattle

Flags given on the command line override what is set here.
"""

import math
import os
import queue
import shutil
import signal
import sys
import tempfile

from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler, PyWSGIServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chattle_http  # noqa: E402  (patches nothing: safe in the master, unlike chattle)
import chattle_metrics  # noqa: E402  (nor does this)
from chattle_limits import GRACEFUL_TIMEOUT, connections_per_worker, raise_descriptor_limit  # noqa: E402


class ChattleWorker(GeventPyWSGIWorker):
    """gunicorn's gevent worker on gevent.pywsgi (as `--worker-class gevent_pywsgi`), with
    the server and handler `python chattle.py` runs: a held poll costs a worker the same
    memory, and a woken one the same work, as it costs one process. `--worker-class
    gevent` on the command line (the seed's command) still serves chattle, through
    gunicorn's own HTTP parser, at about twice the cost per waiter."""

    def run(self):
        import chattle  # in the worker, after gevent has patched it; never in the master

        class Handler(chattle.pywsgi_handler_class(PyWSGIHandler)):
            def wants_access_log(self):
                return bool(self.server.log.cfg.accesslog)

        self.server_class = chattle.pywsgi_server_class(PyWSGIServer)
        self.wsgi_handler = Handler
        super().run()


worker_class = ChattleWorker
bind = os.environ.get("CHATTLE_BIND", "127.0.0.1:8080")
workers = int(os.environ.get("CHATTLE_WORKERS", "1"))

# Every held poll is an open socket. The gevent worker admits only `worker_connections`
# at once and leaves the rest queued in the listen backlog, silently: so take the hard
# descriptor limit and give nearly all of it to connections (chattle_limits.py).
worker_connections = connections_per_worker(raise_descriptor_limit()[0])
backlog = 4096

# A stopping worker waits longer than any client waits for a poll, which is longer than
# any poll is held: the nesting is stated in chattle_limits.py and tested against what
# gunicorn really runs with (tests/server/test_gunicorn.py).
graceful_timeout = GRACEFUL_TIMEOUT
timeout = 30     # heartbeat: a gevent worker that cannot notify the arbiter for 30 s is stuck

# Chattle's limits on each connection (chattle_http.LIMIT_SETTINGS: CHATTLE_HEAD_TIMEOUT,
# CHATTLE_KEEPALIVE_TIMEOUT, CHATTLE_SEND_TIMEOUT, CHATTLE_MAX_HEAD_BYTES,
# CHATTLE_MAX_HEADERS, CHATTLE_MAX_LINE_BYTES). ChattleWorker enforces all of them itself,
# as `python chattle.py` does, and ignores the four gunicorn settings below. gunicorn's own gevent worker
# (`--worker-class gevent`, the seed's command) parses heads with gunicorn's parser and
# gets what gunicorn has closest: `keepalive` bounds both the idle wait and the reading
# of each head, the request line stops at gunicorn's 8190 bytes, headers are capped one
# line at a time rather than together, refusals are gunicorn's HTML pages, and there is
# no send deadline (docs/deploy.md: "gunicorn's own gevent worker").
_limits = chattle_http.HttpLimits.from_environ()
keepalive = math.ceil(_limits.keepalive_timeout)  # a long-poll client asks again at once: reuse its connection
limit_request_line = min(_limits.max_line_bytes, _limits.max_head_bytes, 8190)
limit_request_fields = min(_limits.max_headers, 32768)
limit_request_field_size = _limits.max_head_bytes

accesslog = os.environ.get("CHATTLE_GUNICORN_ACCESSLOG") or None

# Nothing here uses gunicorn's control socket, and its one default path per user would be
# fought over by every master started at once (tests, sweeps, several workers' runs).
control_socket_disable = True


# A worker runs the master's signal handlers from fork until gunicorn's
# Worker.init_signals, which comes after gevent has patched and chattle's modules have
# loaded (up to a second on a busy machine). The master's handler only queues a signal,
# in this process's copy of the master's queue, which nothing reads: a SIGTERM that
# reached a booting worker (the master stopped right after it started, or while it
# replaced a worker) was lost, and the master waited out the whole graceful timeout
# for a worker that was never told to stop. Both gunicorn internals this reads (the
# arbiter's SIG_QUEUE, and `alive` ending Worker.run) are checked by
# tests/server/test_gunicorn.py against the pinned version.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


# Opt-in to gunicorn workers that each keep a history of their own (the in-memory bus), for
# measurements only: memory and capacity per worker without Redis. Never for chat.
SPLIT_HISTORY = "CHATTLE_SPLIT_HISTORY"


def split_history(workers):
    """Why `workers` workers must not start as configured: several on the in-memory bus would
    each number a room's posts themselves (answering 1, 1, 2, 2), and a client would see
    another history whenever its next request lands elsewhere. None when they may."""
    shared = any(os.environ.get(name, "").strip() for name in ("CHATTLE_REDIS_URL", "CHATTLE_REDIS_CLUSTER"))
    if workers <= 1 or shared or os.environ.get(SPLIT_HISTORY, "").strip() == "1":
        return None
    return ("chattle: %d gunicorn workers on the in-memory bus would each keep a history of their own "
            "(one room's posts numbered 1, 1, 2, 2); share one: set CHATTLE_REDIS_URL=redis://<host>:6379/0 "
            "(or CHATTLE_REDIS_CLUSTER=<host>:<port>), or run `make run WORKERS=%d`, which starts a "
            "redis-server for them; or run 1 worker" % (workers, workers))


def on_starting(server):
    """Refuse in the master, before any worker starts, what split_history refuses.
    `server.cfg.workers` is what gunicorn runs: -w/--workers over CHATTLE_WORKERS (this
    file's `workers`); `--env` has already been applied to os.environ."""
    refused = split_history(server.cfg.workers)
    if refused:
        raise SystemExit(refused)
    share_metrics()


# The folder this master's workers write their figures to, for /metrics to sum them
# (chattle_metrics.py): CHATTLE_METRICS_DIR, or one made for this master and removed with it.
_metrics_folder_made = []


def share_metrics():
    directory = os.environ.get(chattle_metrics.DIRECTORY_VARIABLE, "").strip()
    if not directory:
        directory = tempfile.mkdtemp(prefix="chattle-metrics-")
        _metrics_folder_made.append(directory)
        os.environ[chattle_metrics.DIRECTORY_VARIABLE] = directory  # the workers inherit it
    chattle_metrics.prepare(directory)


def child_exit(server, worker):
    """In the master, as a worker has exited: its counters stay in /metrics' sums, its gauges go."""
    directory = os.environ.get(chattle_metrics.DIRECTORY_VARIABLE)
    if directory:
        chattle_metrics.retire(directory, worker.pid)


def on_exit(server):
    for directory in _metrics_folder_made:
        shutil.rmtree(directory, ignore_errors=True)


def nworkers_changed(server, new_value, old_value):
    """SIGTTIN adds a worker to a running master: not one that would split the history."""
    refused = split_history(new_value) if old_value is not None else None
    if refused:
        server.log.error("%s; SIGTTIN ignored", refused)
        server.num_workers = old_value  # this hook again, with a count it accepts


def post_fork(server, worker):
    """Keep a stop asked for while this worker boots: it ends the worker once booted."""

    def stop_once_booted(_signum, _frame):
        worker.alive = False

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop_once_booted)
    if STOP_SIGNALS_QUEUED.intersection(_drain(getattr(server, "SIG_QUEUE", None))):
        worker.alive = False  # one arrived between fork and this hook


STOP_SIGNALS_QUEUED = frozenset(STOP_SIGNALS)


def _drain(signal_queue):
    """What the master's handler queued in this process (the master's own pending
    signals at fork time among them: a master about to stop stops this worker too)."""
    queued = []
    while signal_queue is not None:
        try:
            queued.append(signal_queue.get_nowait())
        except queue.Empty:
            break
    return queued


def post_worker_init(worker):
    """On SIGTERM, answer every held poll at once instead of sitting out the graceful
    timeout; and tune the worker's garbage collector as `python chattle.py` does."""
    import gevent

    import chattle

    stop = worker.handle_exit

    def handle_exit(signum, frame):
        stop(signum, frame)
        gevent.spawn(chattle.rooms.close)

    signal.signal(signal.SIGTERM, handle_exit)
    if not worker.alive:  # stopped while booting: what it accepts meanwhile is answered at once
        gevent.spawn(chattle.rooms.close)
    try:
        # the shared bus's reader follows Redis before the first request arrives; a Redis
        # or Redis Cluster that is down does not stop the worker: it serves 503 meanwhile,
        # and recovers by itself
        chattle.say_if_degraded(chattle.get_bus())
    except SystemExit as refused:
        # a setting that can never work (a malformed --redis-cluster): say why once, and stop
        # gunicorn ("worker failed to boot") rather than have it start workers again and again
        sys.stderr.write("%s\n" % refused)
        sys.exit(3)
    chattle.tune_garbage_collector()
    directory = os.environ.get(chattle_metrics.DIRECTORY_VARIABLE)
    if directory:
        chattle_metrics.share_through(directory, chattle.worker_figures)


def pre_request(worker, req):
    """Close the connection after refusing a declared body over the limit (413).

    Gunicorn's own gevent worker (`--worker-class gevent`) drops an application's
    `Connection: close` header, so without this it keeps the connection and reads the
    rest of the refused body to find the next request. ChattleWorker does not call this
    hook: pywsgi honours the answer's `Connection: close` itself."""
    import chattle

    for name, value in req.headers:
        if name == "CONTENT-LENGTH" and value.strip().isdigit() and int(value) > chattle.MAX_BODY_BYTES:
            req.must_close = True


def worker_exit(server, worker):
    import chattle
    chattle_metrics.final_snapshot(chattle.worker_figures)
    if chattle.bus is not None:
        chattle.bus.close()
