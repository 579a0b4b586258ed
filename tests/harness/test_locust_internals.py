"""What the load harness relies on inside Locust and gevent, checked so an upgrade that
changes it fails here, loudly, instead of silently losing a run's figures."""

import inspect
import time

import locust
import locust.main
import locust.runners
from locust.env import Environment


def test_locust_is_the_pinned_version():
    # The worker-report path below was read in this version; re-read it before moving on.
    assert locust.__version__ == "2.47.0"


def test_a_worker_report_is_sent_by_send_stats_and_fires_report_to_master():
    """report_now() calls WorkerRunner._send_stats so a drained worker reports at once."""
    source = inspect.getsource(locust.runners.WorkerRunner._send_stats)
    assert "report_to_master.fire" in source and 'Message("stats"' in source


def test_the_master_hands_worker_reports_to_worker_report_listeners():
    source = inspect.getsource(locust.runners.MasterRunner.handle_message)
    assert 'case "stats":' in source and "worker_report.fire" in source


def test_a_worker_stops_its_users_before_it_says_it_stopped():
    """The final report (test_stop on the worker) must reach the master before
    client_stopped: both go out in this order from the worker's message handler."""
    source = inspect.getsource(locust.runners.WorkerRunner.handle_message)
    stop = source.index('case "stop":')
    assert source.index("self.stop()", stop) < source.index('"client_stopped"', stop)


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


def test_the_worker_still_rebuilds_its_argument_defaults_per_spawn_message():
    """loadtests/locustfile.py caches argument_parser.default_args_dict (cache_default_args):
    the worker's spawn handling calls it once per option of every message."""
    from locust import argument_parser

    import loadtests.locustfile  # noqa: F401  (applies the cache)
    source = inspect.getsource(locust.runners.WorkerRunner.handle_message)
    assert "argument_parser.default_args_dict()" in source
    assert hasattr(argument_parser.default_args_dict, "cache_info")
