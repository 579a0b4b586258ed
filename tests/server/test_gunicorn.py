"""The seed's deployment command, run for real from the repository root:

    gunicorn --bind 127.0.0.1:<port> --worker-class gevent --workers 1 chattle

so gunicorn.conf.py is picked up from the working directory exactly as it is in use.
"""

import os
import re
import resource
import signal
import time

import gevent
import pytest

import chattle
from chattle_limits import client_timeout, connections_per_worker
from clients import GENEROUS, HttpConnection, effective_config
from harness.processes import ROOT, get_json, post_json, wait_until


def test_config_is_sized_for_long_polls():
    config = effective_config()
    assert config["worker_class"] == "gevent"
    assert int(config["worker_connections"]) > 1000  # the default 1000 silently queues the rest
    assert float(config["timeout"]) > 0 and int(config["backlog"]) >= 1024
    assert config["control_socket_disable"] == "True"


def test_make_load_counts_the_connections_gunicorn_admits():
    """make load's preflight weighs its users against chattle_limits.connections_per_worker;
    gunicorn must really run with that figure, under the hard limit it raises itself to."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert int(effective_config()["worker_connections"]) == connections_per_worker(hard)


def page_constant(name):
    """A `var NAME = <number>;` of the page's script (static/chattle.js)."""
    with open(os.path.join(ROOT, "static", "chattle.js")) as script:
        return float(re.search(r"\bvar %s = (\d+(?:\.\d+)?);" % name, script.read()).group(1))


def test_timeouts_nest_where_they_are_in_effect(wsgi):
    """poll <= the server's longest hold < what a client waits < gunicorn's graceful timeout,
    each figure read from where it acts: the server's answer, the page's script and the
    configuration gunicorn really runs the seed's command with."""
    longest_hold = chattle.MAX_POLL_TIMEOUT
    assert wsgi("POST", "/rooms/t/msgs", body='{"from": "ann", "content": "hi"}',
                headers={"Content-Type": "application/json"}).status == 201  # so a poll since 0 answers at once
    assert wsgi("GET", "/rooms/t/msgs", query="since=0&timeout=%g" % longest_hold).status == 200
    assert wsgi("GET", "/rooms/t/msgs", query="since=0&timeout=%g" % (longest_hold + 0.5)).status == 400
    page_poll, page_gives_up = page_constant("POLL_TIMEOUT_S"), page_constant("POLL_ABORT_MS") / 1000
    assert page_poll <= longest_hold
    assert page_gives_up == client_timeout(page_poll)  # the rule the load clients and the rig follow too
    graceful = float(effective_config()["graceful_timeout"])
    assert longest_hold < client_timeout(longest_hold) < graceful


def test_post_and_long_poll_round_trip(seed_gunicorn):
    server = seed_gunicorn()
    status, health = get_json(server.url + "/health")
    assert status == 200 and health["bus"] == "memory" and health["pid"] != server.pid  # a worker answers
    assert post_json(server.url + "/rooms/g/msgs", {"from": "ann", "content": "first"})[0] == 201
    held = gevent.spawn(get_json, server.url + "/rooms/g/msgs?since=1&timeout=30", 40)
    wait_until(lambda: get_json(server.url + "/stats")[1]["waiters"] == 1, GENEROUS, "the poll is held")
    status, posted = post_json(server.url + "/rooms/g/msgs", {"from": "bob", "content": "second"})
    assert status == 201 and posted["id"] == 2
    status, body = held.get(timeout=30)
    assert status == 200 and body["cursor"] == 2
    assert [(message["id"], message["content"]) for message in body["messages"]] == [(2, "second")]


def test_oversized_body_is_refused_and_the_connection_closed(seed_gunicorn):
    server = seed_gunicorn()
    connection = HttpConnection(server.port)
    connection.sock.sendall(b"POST /msgs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 10000000\r\n\r\n" + b"x" * 1000)
    status, headers, body = connection.receive()
    assert status == 413 and "error" in body
    # gunicorn drops the application's own "Connection: close"; gunicorn.conf.py's
    # pre_request closes instead of reading the rest of the refused body
    assert headers["connection"] == "close"
    assert connection.server_closed(within=10)
    connection.close()


def test_sigterm_answers_held_polls_and_the_master_exits(seed_gunicorn):
    server = seed_gunicorn()
    post_json(server.url + "/rooms/stop/msgs", {"from": "ann", "content": "before"})

    def held_poll():
        connection = HttpConnection(server.port)
        try:
            return connection.request("GET", "/rooms/stop/msgs?since=1&timeout=60")
        finally:
            connection.close()

    polls = [gevent.spawn(held_poll) for _ in range(20)]
    wait_until(lambda: get_json(server.url + "/stats")[1]["waiters"] == 20, GENEROUS, "20 held polls")
    server.signal(signal.SIGTERM)
    # graceful_timeout is 75 s and the polls asked for 60: answering within 20 s shows
    # the worker answered them on SIGTERM instead of sitting out either.
    gevent.joinall(polls, timeout=20)
    assert all(greenlet.ready() for greenlet in polls), "held polls were not answered on SIGTERM"
    for greenlet in polls:
        status, _headers, body = greenlet.get()
        assert status == 200 and body["messages"] == [] and body["cursor"] == 1
    deadline = time.monotonic() + 20
    while server.alive() and time.monotonic() < deadline:
        gevent.sleep(0.1)
    assert not server.alive(), "the gunicorn master did not exit after SIGTERM"
    assert server.popen.returncode == 0


# A wrapper around gunicorn.conf.py whose post_fork holds a new worker, before or after
# chattle's own post_fork, until the test says go: the window in which a booting worker
# still runs the master's signal handlers, made as wide as the test needs.
PAUSED_BOOT_CONFIG = '''
import os, runpy, time
globals().update(runpy.run_path({config!r}))
chattles_post_fork = globals().get("post_fork", lambda server, worker: None)


def post_fork(server, worker):
    if {before!r}:
        hold_while_asked()
    chattles_post_fork(server, worker)
    if not {before!r}:
        hold_while_asked()


def hold_while_asked():
    if not os.path.exists(os.path.join({pauses!r}, "pause")):
        return
    open(os.path.join({pauses!r}, "%d.booting" % os.getpid()), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join({pauses!r}, "go")) and time.monotonic() < deadline:
        time.sleep(0.01)
'''


@pytest.mark.parametrize("held", ["before chattle's post_fork", "after chattle's post_fork"])
def test_a_stop_that_reaches_a_booting_worker_ends_it_once_booted(start_chattle, tmp_path, held):
    """SIGTERM to the master while a worker boots: the master must not wait out the
    75 s graceful timeout for a worker that lost the signal."""
    config = tmp_path / "paused.conf.py"
    config.write_text(PAUSED_BOOT_CONFIG.format(config=os.path.join(ROOT, "gunicorn.conf.py"),
                                                before=held.startswith("before"), pauses=str(tmp_path)))
    # a second worker on the memory bus, which SIGTTIN is otherwise refused: the test is of its boot
    server = start_chattle(workers=1, gunicorn=True, extra_args=("--config", str(config)),
                           env={"CHATTLE_SPLIT_HISTORY": "1"})
    [booted] = server.worker_pids()
    (tmp_path / "pause").touch()
    try:
        server.signal(signal.SIGTTIN)  # one more worker: it is held in post_fork
        wait_until(lambda: list(tmp_path.glob("*.booting")), GENEROUS, "a second worker held while booting")
        stopped_at = time.monotonic()
        server.signal(signal.SIGTERM)
        # the master signals every worker at once: the booted one ending shows the held one was signalled too
        wait_until(lambda: booted not in server.worker_pids(), GENEROUS, "the booted worker stopped")
    finally:
        (tmp_path / "go").touch()
    wait_until(lambda: not server.alive(), 30, "the master exited, well before the 75 s graceful timeout")
    assert time.monotonic() - stopped_at < 60
    assert server.popen.returncode == 0
