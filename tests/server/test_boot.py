"""Start-up and recovery never depend on Redis being up, and a stop never cuts a post short.

Real gunicorn workers, `python chattle.py` and a real redis-server on loopback: a worker
that boots while Redis is down serves (503 for what needs Redis, /health "degraded" with
the reason) and recovers by itself; gunicorn refuses, in its master, several workers that
would each keep a history of their own; a SIGTERM lets a post inside Redis finish before
the bus closes.
"""

import os
import signal
import socket
import subprocess
import sys

import gevent
import pytest

import chattle
from clients import close_all, connections_to_each_worker, post_once, wait_for_waiters_across_workers
from harness.processes import ROOT, Process, RedisServer, free_port, get_json, wait_until

BOUND = 30.0  # seconds: a bound on what takes milliseconds, on a loaded machine


def post_body(content):
    return {"from": "ann", "content": content}


# -- (a) a worker boots, serves and recovers while Redis is down ------------------------------------

def test_a_worker_replaced_while_redis_is_down_boots_serves_503_and_recovers(start_chattle, redis_server):
    server = start_chattle(workers=2, redis_url=redis_server.url)
    killed = server.worker_pids()[0]
    redis_server.stop()
    os.kill(killed, signal.SIGKILL)
    # the master stays up (wait_until fails at once if it exits) and boots a new worker
    wait_until(lambda: len(server.worker_pids()) == 2 and killed not in server.worker_pids(), BOUND,
               "gunicorn replaced the killed worker", server)
    workers = connections_to_each_worker(server.port, server.worker_pids())
    try:
        for pid, connection in workers.items():
            status, _headers, body = connection.request("GET", "/health")
            assert status == 503 and body["status"] == "degraded" and body["pid"] == pid, body
            assert "Redis does not answer" in body["reason"], body
            status, headers, body = connection.request("POST", "/rooms/boot/msgs", post_body("while down"))
            assert status == 503 and headers.get("retry-after") == "1", (status, headers, body)
            assert "nothing was written" in body["error"], body
    finally:
        close_all(workers)
    assert server.alive()

    redis_server.restart()  # the same port: every worker finds it again by itself
    wait_until(lambda: all(get_json(server.url + "/health")[0] == 200 for _ in range(4)), BOUND, "health back")
    workers = connections_to_each_worker(server.port, server.worker_pids())
    try:
        (holder, held), (_poster, posting) = sorted(workers.items())
        status, _headers, body = held.request("GET", "/rooms/boot/msgs?since=0&timeout=0")
        assert status == 200 and body["cursor"] == 0, body  # nothing was written during the outage
        held.send("GET", "/rooms/boot/msgs?since=0&timeout=20")
        wait_for_waiters_across_workers(server, 1)
        status, _headers, body = posting.request("POST", "/rooms/boot/msgs", post_body("after"))
        assert status == 201 and body["id"] == 1, body
        status, _headers, body = held.receive()
        assert status == 200 and [(m["id"], m["content"]) for m in body["messages"]] == [(1, "after")], body
        status, _headers, body = posting.request("GET", "/rooms/boot/msgs?since=0&timeout=0")
        assert [m["id"] for m in body["messages"]] == [1], body
        assert holder in server.worker_pids()
    finally:
        close_all(workers)


class ChattleProcess(Process):
    """`python chattle.py` started without waiting for it to be healthy (Redis may be down)."""

    def __init__(self, tmp_path, *args):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        super().__init__([sys.executable, os.path.join(ROOT, "chattle.py"), "--port", str(self.port), *args],
                         env=dict(os.environ, PYTHONUNBUFFERED="1"), log_path=str(tmp_path / "chattle.log"))

    def answers(self):
        return get_json(self.url + "/health", timeout=2)[0] is not None


def test_python_chattle_started_while_redis_is_down_serves_503_then_recovers(tmp_path):
    port = free_port()
    server = ChattleProcess(tmp_path, "--redis", "redis://127.0.0.1:%d/0" % port)
    redis = None
    try:
        wait_until(server.answers, BOUND, "python chattle.py serving without its Redis", server)
        status, body = get_json(server.url + "/health")
        assert status == 503 and body["status"] == "degraded" and "Redis does not answer" in body["reason"], body
        status, body, retry_after = post_once(server.port, "late", "before Redis")
        assert status == 503 and retry_after == "1", body
        status, body = get_json(server.url + "/rooms/late/msgs?since=0&timeout=0")
        assert status == 503 and "unreachable" in body["error"], body
        assert "unreachable" in server.log_tail()  # said once at start, with the reason

        workdir = tmp_path / "redis"
        workdir.mkdir()
        redis = RedisServer(workdir=str(workdir), port=port)
        wait_until(lambda: get_json(server.url + "/health")[0] == 200, BOUND, "health back", server)
        status, body, _retry = post_once(server.port, "late", "after Redis")
        assert status == 201 and body["id"] == 1, body
        status, body = get_json(server.url + "/rooms/late/msgs?since=0&timeout=0")
        assert [(m["id"], m["content"]) for m in body["messages"]] == [(1, "after Redis")], body
    finally:
        server.stop()
        if redis is not None:
            redis.stop()


# -- (b) several gunicorn workers on the in-memory bus: refused in the master -------------------------

def gunicorn_run(argv, env):
    """gunicorn with this repository's gunicorn.conf.py on a free loopback port, expected to end by itself."""
    clean = {name: value for name, value in os.environ.items()
             if name not in ("CHATTLE_REDIS_URL", "CHATTLE_REDIS_CLUSTER", "CHATTLE_SPLIT_HISTORY",
                             "CHATTLE_WORKERS", "WEB_CONCURRENCY")}
    clean.update(env, CHATTLE_BIND="127.0.0.1:%d" % free_port())
    return subprocess.run([sys.executable, "-m", "gunicorn", "--config", os.path.join(ROOT, "gunicorn.conf.py"),
                           *argv, "chattle"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=clean)


def test_several_workers_on_the_memory_bus_are_refused_with_the_fix():
    for argv, env in ((["--workers", "2"], {}), (["-w", "3"], {}), ([], {"CHATTLE_WORKERS": "2"})):
        done = gunicorn_run(argv, env)
        assert done.returncode != 0, (argv, env, done.stderr[-2000:])
        said = done.stderr
        assert "in-memory bus" in said and "CHATTLE_REDIS_URL" in said and "make run WORKERS=" in said, said[-2000:]
        assert "Booting worker" not in said and "Traceback" not in said, said[-2000:]


def test_sigttin_adds_no_worker_on_the_memory_bus(start_chattle):
    server = start_chattle(workers=1, gunicorn=True)
    before = server.worker_pids()
    server.signal(signal.SIGTTIN)
    wait_until(lambda: "SIGTTIN ignored" in server.log_tail(), BOUND, "the master refusing a second worker", server)
    assert server.worker_pids() == before


def test_a_malformed_cluster_address_stops_gunicorn_with_the_reason():
    done = gunicorn_run([], {"CHATTLE_REDIS_CLUSTER": "no-port-here"})
    assert done.returncode != 0 and "host:port" in done.stderr, done.stderr[-2000:]


def test_split_history_is_an_explicit_opt_in(start_chattle):
    """CHATTLE_SPLIT_HISTORY=1 (measurements only) starts them: each worker numbers its own posts."""
    server = start_chattle(workers=2, env={"CHATTLE_SPLIT_HISTORY": "1"})
    workers = connections_to_each_worker(server.port, server.worker_pids())
    try:
        ids = [connection.request("POST", "/rooms/split/msgs", post_body("m"))[2]["id"]
               for connection in list(workers.values()) * 2]
    finally:
        close_all(workers)
    assert ids == [1, 1, 2, 2]


# -- (c) a SIGTERM lets a post inside the bus finish before the bus closes ------------------------

def post_paused(admin):
    """Whether a post's script waits in Redis, held by CLIENT PAUSE (flag b, its EVALSHA)."""
    return any(client.get("cmd") == "evalsha" and "b" in client.get("flags", "") for client in admin.client_list())


def refuses_connections(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def stop_under_a_post_inside_redis(tmp_path, redis_server, *args):
    """SIGTERM to `python chattle.py` (with `args`) while a post's script waits in Redis, held
    by CLIENT PAUSE until the server has stopped accepting (for less than the bus's 2 s
    socket timeout); (what the post got, the server's exit code)."""
    import redis

    admin = redis.Redis.from_url(redis_server.url, decode_responses=True)
    server = ChattleProcess(tmp_path, "--redis", redis_server.url, *args)
    try:
        wait_until(lambda: get_json(server.url + "/health")[0] == 200, BOUND, "python chattle.py on Redis", server)
        assert post_once(server.port, "stop", "first")[1]["id"] == 1  # the script cached, a connection made
        admin.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
        try:
            posting = gevent.spawn(post_once, server.port, "stop", "in flight", 20)
            wait_until(lambda: post_paused(admin), BOUND, "the post's script waiting in Redis")
            server.signal(signal.SIGTERM)
            wait_until(lambda: refuses_connections(server.port) or not server.alive(), BOUND, "the server stopping")
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
        posting.join(BOUND)
        return (posting.value if posting.successful() else posting.exception), server.popen.wait(BOUND)
    finally:
        server.stop()
        admin.close()


def test_sigterm_lets_a_post_inside_redis_finish_before_the_bus_closes(tmp_path, redis_server):
    got, exit_code = stop_under_a_post_inside_redis(tmp_path, redis_server)
    assert not isinstance(got, BaseException), got  # answered, not cut off
    status, body, _retry = got
    assert status == 201 and body["id"] == 2, body
    assert exit_code == 0


def test_a_stop_timeout_of_0_closes_the_bus_under_the_post(tmp_path, redis_server):
    """What --stop-timeout bounds: with 0 the bus closes at once, under the post, which is not
    answered 201 (whether Redis ran it depends on when the connection went)."""
    got, _exit_code = stop_under_a_post_inside_redis(tmp_path, redis_server, "--stop-timeout", "0")
    assert isinstance(got, BaseException) or got[0] != 201, got


def test_the_stop_timeout_is_checked():
    for wrong in (-1, 3601):
        with pytest.raises(SystemExit, match="--stop-timeout must be 0"):
            chattle.Settings(stop_timeout=wrong)
