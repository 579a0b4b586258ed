"""What the load harness relies on inside Locust and gevent, checked so an upgrade that
changes it fails here, loudly, instead of silently losing a run's figures. Where the
harness relies on how Locust behaves between a master and its workers, a real master and
worker in this process, on loopback, show it."""

import contextlib
import logging
import signal
import socket
import subprocess
import sys
import time

import gevent
import locust
import locust.main
import locust.runners
from locust import LoadTestShape, User, constant, task
from locust.env import Environment
from locust.event import Events

from loadtests.tally import WorkerTally


def test_locust_is_the_pinned_version():
    # What the tests below observe was observed in this version; run them again before moving on.
    assert locust.__version__ == "2.47.0"


class _Idle(User):
    wait_time = constant(1)

    @task
    def idle(self):
        pass


@contextlib.contextmanager
def _master_and_worker(master_options=None):
    """A real Locust master and worker in this process, talking over loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    master_env = Environment(user_classes=[_Idle], events=Events(), parsed_options=master_options)
    master = master_env.create_master_runner("127.0.0.1", port)
    worker_env = Environment(user_classes=[_Idle], events=Events())
    worker = worker_env.create_worker_runner("127.0.0.1", port)
    try:
        assert _waited_for(lambda: len(master.clients.ready) == 1), "the worker never connected"
        yield master, worker
    finally:
        worker.quit()
        master.quit()


def _waited_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.02)
    return True


def test_a_drained_worker_s_report_reaches_the_master_at_once(monkeypatch):
    """report_now() sends the worker's tally as a custom message: the master's listener
    (listen_for_tallies) adds it up with the worker's id, well before Locust's next
    periodic report would have carried it."""
    from loadtests import locustfile

    merged = []
    monkeypatch.setattr(locustfile, "add_tally", lambda client_id, data: merged.append((client_id, data)))
    monkeypatch.setattr(locustfile, "TALLY", WorkerTally())
    with _master_and_worker() as (master, worker):
        locustfile.listen_for_tallies(master)
        sent = time.monotonic()
        locustfile.report_now(worker.environment)
        assert _waited_for(lambda: merged, seconds=locust.runners.WORKER_REPORT_INTERVAL)
        took = time.monotonic() - sent
    assert took < locust.runners.WORKER_REPORT_INTERVAL / 2, took
    (client_id, data), = merged
    assert client_id == worker.client_id and data["chattle"]["sequence"] >= 0


def test_a_worker_s_report_at_test_stop_reaches_the_master_before_it_says_it_stopped(monkeypatch):
    """The final report (report_now from the worker's test_stop) must reach the master
    while the master still counts the worker: its client_stopped message, which removes
    the worker's node from master.clients (client_ready then adds a new one), comes after."""
    from loadtests import locustfile

    seen = []
    monkeypatch.setattr(locustfile, "TALLY", WorkerTally())
    with _master_and_worker() as (master, worker):
        node = master.clients[worker.client_id]  # a worker ready again after it stopped is a new node
        monkeypatch.setattr(locustfile, "add_tally",
                            lambda client_id, data: seen.append(master.clients.get(client_id) is node))
        locustfile.listen_for_tallies(master)
        worker.environment.events.test_stop.add_listener(lambda environment, **_: locustfile.report_now(environment))
        master.start(1, 10)
        assert _waited_for(lambda: worker.user_count == 1)
        master.stop()
        assert _waited_for(lambda: seen)
    assert seen == [True], seen


_SHAPE_LOCUSTFILE = """
from locust import LoadTestShape, User, constant, task


class Idle(User):
    wait_time = constant(1)

    @task
    def idle(self):
        pass


class Forever(LoadTestShape):
    def tick(self):
        return (0, 1)
"""


def _locust(tmp_path, *args, locustfile=_SHAPE_LOCUSTFILE):
    path = tmp_path / "locustfile.py"
    path.write_text(locustfile)
    return subprocess.Popen([sys.executable, "-m", "locust", "-f", str(path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)


def test_a_headless_shape_run_handles_no_sigterm_so_the_orchestrator_asks_with_sigusr1(tmp_path):
    """loadtests.run stops a run early with SIGUSR1 (the shape then ends it as a run ends)
    because a headless Locust running a shape has no SIGTERM handler yet: SIGTERM ends
    the process at once, with no report written."""
    process = _locust(tmp_path, "--headless", "--loglevel", "INFO")
    lines = []

    def read_until_the_shape_runs():
        for line in process.stdout:
            lines.append(line)
            if "Shape worker starting" in line:
                return

    try:
        gevent.with_timeout(30, read_until_the_shape_runs, timeout_value=None)
        assert any("Shape worker starting" in line for line in lines), "".join(lines)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == -signal.SIGTERM, "".join(lines) + process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_shape_ends_a_headless_run_by_quitting_the_runner():
    """A shape whose tick returns None ends a headless run with quit (the runner's
    greenlets end, so main() goes on to write the run), not stop (which waits for more)."""
    class TwoTicks(LoadTestShape):
        ticks = 0

        def tick(self):
            self.ticks += 1
            return (0, 1) if self.ticks == 1 else None

    from locust.argument_parser import parse_options
    environment = Environment(user_classes=[_Idle], events=Events(), shape_class=TwoTicks(),
                              parsed_options=parse_options(["--headless"]))
    runner = environment.create_local_runner()
    assert len(runner.greenlet) > 0  # its own greenlets (the CPU monitor): stop leaves them, quit kills them
    runner.start_shape()
    assert _waited_for(lambda: len(runner.greenlet) == 0), (runner.state, list(runner.greenlet))
    assert runner.state == locust.runners.STATE_STOPPED


def test_the_report_events_the_locustfile_listens_to_exist():
    events = Environment().events
    for name in ("report_to_master", "worker_report", "test_start", "test_stop", "quitting", "quit", "request",
                 "init", "init_command_line_parser"):
        assert hasattr(events, name), name


def test_gevent_keeps_the_original_epoll_for_the_held_poll_driver():
    from gevent.monkey import get_original
    epoll = get_original("select", "epoll")()
    assert hasattr(epoll, "poll") and epoll.fileno() >= 0
    epoll.close()


def test_the_master_marks_a_worker_it_no_longer_hears_missing():
    """StagedShape.connected_workers reads runner.clients.all and each WorkerNode's state:
    a worker that falls silent (its greenlets gone, no quit sent) is marked STATE_MISSING
    after HEARTBEAT_LIVENESS heartbeats."""
    from loadtests.shapes import StagedShape

    with _master_and_worker() as (master, worker):
        shape = StagedShape()
        shape.runner = master
        assert shape.connected_workers() == {worker.client_id}
        worker.greenlet.kill(block=True)
        wait = (locust.runners.HEARTBEAT_LIVENESS + 3) * locust.runners.HEARTBEAT_INTERVAL
        assert _waited_for(lambda: shape.connected_workers() == set(), seconds=wait), [
            (node.id, node.state) for node in master.clients.all]
        assert master.clients[worker.client_id].state == locust.runners.STATE_MISSING


def test_a_master_waits_for_remote_workers_with_expect_workers_and_a_bounded_wait(tmp_path):
    """loadtests.run --remote-workers passes --expect-workers and --expect-workers-max-wait
    (an int): a master whose workers never come gives up after that wait, and fails."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    process = _locust(tmp_path, "--master", "--headless", "--master-bind-host", "127.0.0.1",
                      "--master-bind-port", str(port), "--expect-workers", "2", "--expect-workers-max-wait", "2",
                      "-u", "1", "-r", "1")
    try:
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    took = time.monotonic() - started
    assert process.returncode != 0 and "waiting for workers" in output.lower(), output
    assert took >= 2, took


def test_locust_itself_only_warns_about_a_worker_of_another_version(caplog):
    """Hence RunTally(locust_version) turns a mismatch into an error that stops the run:
    Locust's master takes a worker of another version in, with a warning."""
    from locust.rpc import Message

    def warned():
        return any("different version" in record.getMessage() for record in caplog.records)

    with _master_and_worker() as (master, worker):
        with caplog.at_level(logging.WARNING, logger="locust.runners"):
            worker.client.send(Message("client_ready", "2.31.0", worker.client_id))  # as an older worker says it
            assert _waited_for(warned), caplog.text
        assert worker.client_id in master.clients and len(master.clients.ready) == 1


def _stats_fields(entry):
    fields = entry.serialize()
    fields.pop("start_time")  # when the RequestStats was made
    return fields


def test_logging_untimed_answers_in_bulk_leaves_what_one_event_each_would():
    """HeldPolls logs a batch of held-poll answers in one log_untimed call instead of one
    request event each; Locust's statistics must come out the same, field by field."""
    from locust.stats import RequestStats

    from loadtests.locust_stats import log_untimed

    one_by_one, in_bulk = RequestStats(), RequestStats()
    for stats in (one_by_one, in_bulk):
        stats.log_request("POST", "post", 12, 40)  # an earlier timed request shares the total
    now = int(time.time()) + 0.25
    lengths = [180, 181, 179, 180, 250]
    with _frozen_time(now):
        for length in lengths:
            one_by_one.log_request("GET", "poll (held)", None, length)
    log_untimed(in_bulk, "GET", "poll (held)", len(lengths), sum(lengths), now=now)
    assert _stats_fields(in_bulk.get("poll (held)", "GET")) == _stats_fields(one_by_one.get("poll (held)", "GET"))
    assert _stats_fields(in_bulk.total) == _stats_fields(one_by_one.total)


class _frozen_time:
    """time.time() inside locust.stats fixed at `now`, so both ways log in one second."""

    def __init__(self, now):
        self.now = now

    def __enter__(self):
        import locust.stats
        self.original = locust.stats.time
        locust.stats.time = type("FrozenTime", (), {"time": staticmethod(lambda: self.now)})
        return self

    def __exit__(self, *_exc):
        import locust.stats
        locust.stats.time = self.original


def test_a_worker_builds_its_argument_parser_at_most_twice_however_many_spawn_messages(monkeypatch):
    """Locust 2.47's worker asks argument_parser.default_args_dict() once per option of
    every spawn message, and each call builds the whole parser (about 3 ms): a real
    master spawning 30 users at 10/s, 56 options sent, built it 169 times for 0.6 s of
    CPU, 300 users 1,681 times for 7 s. loadtests/locustfile.py caches the defaults
    (cache_default_args): the worker builds the parser once for its own options and
    once for the defaults, however many messages come."""
    from locust import argument_parser

    import loadtests.locustfile  # noqa: F401  (applies the cache)

    master_options = argument_parser.parse_options(["--headless"])
    builds = []
    build = argument_parser.get_empty_argument_parser
    monkeypatch.setattr(argument_parser, "get_empty_argument_parser",
                        lambda *args, **kwargs: builds.append(1) or build(*args, **kwargs))
    getattr(argument_parser.default_args_dict, "cache_clear", lambda: None)()
    with _master_and_worker(master_options) as (master, worker):
        master.start(30, 15)
        assert _waited_for(lambda: worker.user_count == 30)
    assert len(builds) <= 2, "the worker built its argument parser %d times" % len(builds)
    asked = argument_parser.default_args_dict.cache_info()
    assert asked.hits + asked.misses > len(vars(master_options)), (
        "the worker no longer asks for the defaults per option: is the cache still needed?", asked)
