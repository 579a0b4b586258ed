"""What the load harness relies on inside Locust and gevent, checked so an upgrade that
changes it fails here, loudly, instead of silently losing a run's figures."""

import inspect

import locust
import locust.runners
import pytest
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


def test_the_masters_stop_waits_for_every_worker_to_stop():
    """drain_before_quitting relies on MasterRunner.stop() sending stop and waiting for
    the users to reach zero; quit() alone gives the workers half a second."""
    source = inspect.getsource(locust.runners.MasterRunner.stop)
    assert 'Message("stop"' in source and "while self.user_count != 0" in source
    assert set(inspect.signature(locust.runners.MasterRunner.stop).parameters) == {"self", "send_stop_to_client"}


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


@pytest.mark.parametrize("state", ["STATE_SPAWNING", "STATE_RUNNING"])
def test_the_runner_states_the_quitting_drain_checks_exist(state):
    assert getattr(locust.runners, state) in ("spawning", "running")


def test_a_spawn_message_asks_for_the_default_arguments_per_option_so_caching_them_pays():
    """The locustfile caches argument_parser.default_args_dict (it rebuilt Locust's parser
    once per option of each spawn message); the cache is only safe while it takes no
    arguments and its callers only read the dict."""
    from locust import argument_parser

    import loadtests.locustfile  # noqa: F401  (installs the cache)
    source = inspect.getsource(locust.runners.WorkerRunner.handle_message)
    assert "if k not in argument_parser.default_args_dict()" in source
    assert hasattr(argument_parser.default_args_dict, "cache_info")
    assert inspect.signature(argument_parser.default_args_dict.__wrapped__).parameters == {}
    assert argument_parser.default_args_dict() is argument_parser.default_args_dict()
