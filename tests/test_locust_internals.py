"""What the load harness relies on inside Locust and gevent, checked so an upgrade that
changes it fails here, loudly, instead of silently losing a run's figures. Where the
harness relies on how Locust behaves between a master and its workers, a real master and
worker in this process, on loopback, show it."""

import contextlib
import inspect
import socket
import time

import gevent
import locust
import locust.main
import locust.runners
from locust import User, constant, task
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


def test_a_headless_shape_run_handles_no_sigterm_so_the_orchestrator_asks_with_sigusr1():
    """loadtests.run stops a run early with SIGUSR1 (the shape then ends it as a run ends)
    because Locust's main() waits on the shape before it installs its SIGTERM handler."""
    source = inspect.getsource(locust.main.main)
    assert source.index("shape_greenlet.join()") < source.index("gevent.signal_handler(signal.SIGTERM")


def test_the_shape_ends_a_headless_run_with_quit():
    source = inspect.getsource(locust.runners.Runner.shape_worker)
    assert "self.quit()" in source


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


def test_the_master_knows_which_workers_it_still_hears():
    """StagedShape.connected_workers reads runner.clients.all and each WorkerNode's state:
    Locust marks a worker STATE_MISSING after HEARTBEAT_LIVENESS silent heartbeats."""
    assert hasattr(locust.runners.WorkerNodes, "all") and locust.runners.STATE_MISSING == "missing"
    node = locust.runners.WorkerNode("w1")
    assert node.id == "w1" and node.state != locust.runners.STATE_MISSING
    source = inspect.getsource(locust.runners.MasterRunner.heartbeat_worker)
    assert "client.state = STATE_MISSING" in source


def test_a_master_waits_for_remote_workers_with_expect_workers_and_a_bounded_wait():
    """loadtests.run --remote-workers passes --expect-workers and --expect-workers-max-wait (an int)."""
    source = inspect.getsource(locust.main.main)
    assert "options.expect_workers_max_wait" in source and "runner.clients.ready" in source
    options = locust.argument_parser.parse_options(["--master", "--expect-workers", "2",
                                                    "--expect-workers-max-wait", "60"])
    assert options.expect_workers == 2 and options.expect_workers_max_wait == 60


def test_locust_itself_only_warns_about_a_worker_of_another_version():
    """Hence RunTally(locust_version) turns a mismatch into an error that stops the run."""
    source = inspect.getsource(locust.runners.MasterRunner.handle_message)
    assert "running a different version" in source and "logger.warning" in source


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
