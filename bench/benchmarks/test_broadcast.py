"""The Event-based broadcast path, timed: one post waking N parked polls.

In-process: N greenlets parked in Room.wait_for_news; the timed part is the post
(Room.add through the memory bus) until every waiter has its encoded answer.
Real sockets: 200 polls held by a real server process; the timed part is the post
until the last answer has been read.
"""

import os
import socket

import gevent
import pytest

import chattle
from harness.processes import ChattleServer, get_json

ROUNDS = {100: 200, 1000: 40, 10000: 15}
SOCKET_POLLS = 200
SOCKET_ROUNDS = 15


def park(room, waiters):
    since = room.last_id
    parked = [gevent.spawn(lambda: (room.wait_for_news(since, 30), room.answer(since, 100))[1])
              for _ in range(waiters)]
    while chattle.rooms.waiters < waiters:
        gevent.sleep(0)
    return parked


@pytest.mark.parametrize("waiters", sorted(ROUNDS))
@pytest.mark.benchmark(group="fan-out in process")
def test_fan_out_in_process(benchmark, waiters):
    chattle.configure(chattle.Settings())
    bus = chattle.get_bus()
    room = chattle.rooms.get("bench")
    bus.publish("bench", "ann", "first")

    def setup():
        return (park(room, waiters),), {}

    def wake(parked):
        bus.publish("bench", "bob", "wake")
        gevent.joinall(parked, timeout=60)
        assert all(g.value is not None for g in parked)

    benchmark.pedantic(wake, setup=setup, rounds=ROUNDS[waiters], iterations=1, warmup_rounds=1)
    chattle.configure(chattle.Settings())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = str(tmp_path_factory.mktemp("bench") / "server.log")
    started = ChattleServer(log_path=log)
    yield started
    started.stop()


def raw_post(port, room):
    body = b'{"from":"bench","content":"wake"}'
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"POST /rooms/%s/msgs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (room.encode(), len(body), body))
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer


@pytest.mark.benchmark(group="fan-out over sockets")
def test_fan_out_over_sockets(benchmark, server):
    room = "bench-%d" % os.getpid()
    raw_post(server.port, room)

    def setup():
        _status, body = get_json("%s/rooms/%s/msgs?limit=1" % (server.url, room))
        request = ("GET /rooms/%s/msgs?since=%d&timeout=60 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                   % (room, body["cursor"])).encode()
        polls = []
        for _ in range(SOCKET_POLLS):
            conn = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            conn.sendall(request)
            polls.append(conn)
        for _ in range(600):  # bounded: 30 s at most
            if get_json(server.url + "/stats")[1]["waiters"] >= SOCKET_POLLS:
                break
            gevent.sleep(0.05)
        return (polls,), {}

    def wake(polls):
        raw_post(server.port, room)
        for conn in polls:
            while conn.recv(65536):  # Connection: close, so the end of the answer is EOF
                pass
            conn.close()

    benchmark.pedantic(wake, setup=setup, rounds=SOCKET_ROUNDS, iterations=1, warmup_rounds=1)
