"""The seed's deployment command, run for real from the repository root:

    gunicorn --bind 127.0.0.1:<port> --worker-class gevent --workers 1 chattle

so gunicorn.conf.py is picked up from the working directory exactly as it is in use.
"""

import os
import signal
import subprocess
import sys
import time

import gevent
import pytest

import chattle
from bench.servers import ROOT, Process, free_port, get_json, post_json, wait_until
from test_longpoll import GENEROUS, HttpConnection

SEED_FLAGS = ["--worker-class", "gevent", "--workers", "1", "chattle"]


def start_gunicorn(log_path):
    port = free_port()
    server = Process([sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:%d" % port, *SEED_FLAGS],
                     cwd=ROOT, log_path=str(log_path))
    server.port = port
    server.url = "http://127.0.0.1:%d" % port
    wait_until(lambda: get_json(server.url + "/health", timeout=1)[0] == 200, 30, "gunicorn /health", server)
    return server


@pytest.fixture
def gunicorn(tmp_path):
    started = []

    def start():
        started.append(start_gunicorn(tmp_path / ("gunicorn-%d.log" % len(started))))
        return started[-1]

    yield start
    for server in started:
        server.stop(grace=20)


def effective_config(env=None):
    """The settings gunicorn really runs the seed's command with, as it reports them."""
    output = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--print-config", "--bind", "127.0.0.1:%d" % free_port(), *SEED_FLAGS],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
        env=None if env is None else dict(os.environ, **env)).stdout
    config = {}
    for line in output.splitlines():
        name, equals, value = line.partition("=")
        if equals:
            config[name.strip()] = value.strip()
    return config


def test_config_is_sized_for_long_polls():
    config = effective_config()
    assert config["worker_class"] == "gevent"
    assert int(config["worker_connections"]) > 1000  # the default 1000 silently queues the rest
    graceful, heartbeat = float(config["graceful_timeout"]), float(config["timeout"])
    client_gives_up = chattle.MAX_POLL_TIMEOUT + 10  # what the page and the load clients use
    assert chattle.MAX_POLL_TIMEOUT < client_gives_up < graceful
    assert heartbeat > 0 and int(config["backlog"]) >= 1024
    assert config["control_socket_disable"] == "True"


def test_post_and_long_poll_round_trip(gunicorn):
    server = gunicorn()
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


def test_oversized_body_is_refused_and_the_connection_closed(gunicorn):
    server = gunicorn()
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


def test_sigterm_answers_held_polls_and_the_master_exits(gunicorn):
    server = gunicorn()
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
