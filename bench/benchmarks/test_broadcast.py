"""The Event-based broadcast path, timed: one post waking N parked polls.

In-process: N greenlets parked in Room.wait_for_news; the timed part is the post
(Room.add through the memory bus) until every waiter has its encoded answer.
Real sockets: 200 polls held by a real server process; the timed part is the post
until the last answer has been read.
"""

import os

import gevent
import pytest

import chattle
from bench.rig import answer_polls, hold_polls
from harness.processes import ChattleServer

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


@pytest.mark.benchmark(group="fan-out over sockets")
def test_fan_out_over_sockets(benchmark, server):
    room = "bench-%d" % os.getpid()

    def setup():
        return (hold_polls(server.url, room, SOCKET_POLLS),), {}

    def wake(polls):
        _seconds, answered = answer_polls(server.url, room, polls)
        assert answered == SOCKET_POLLS

    benchmark.pedantic(wake, setup=setup, rounds=SOCKET_ROUNDS, iterations=1, warmup_rounds=1)
