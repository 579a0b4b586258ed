"""The shared Redis bus inside the test process, against a real redis-server.

Two RedisBus objects with their own Rooms stand for two workers: what one accepts,
the other must serve, with the same ids, `missed` and `reset` as one process would.
"""

import json
import os
import shutil

import pytest

import chattle
from clients import call_wsgi
from harness.processes import wait_until


def answer(room, since, limit=100):
    return json.loads(room.answer(since, limit))


@pytest.fixture
def workers(redis_server):
    """Two buses on one redis-server, each with its own rooms, as two workers would be."""
    made = []

    def make(history=50):
        rooms = chattle.Rooms(history)
        bus = chattle.RedisBus(rooms, redis_server.url, history)
        made.append(bus)
        wait_until(bus.healthy, 10.0, "bus connected")
        return bus

    yield make
    for bus in made:
        bus.close()


def test_ids_are_dense_across_workers_and_every_worker_serves_every_post(workers):
    first, second = workers(), workers()
    first_room, second_room = first.room("hall", 0), second.room("hall", 0)
    ids = [bus.publish("hall", "ann", "m%d" % n)["id"] for n in range(10) for bus in (first, second)]
    assert ids == list(range(1, 21))
    for room in (first_room, second_room):
        wait_until(lambda room=room: room.last_id == 20, 10.0, "reader delivered every post")
        got = answer(room, 0)
        assert [m["id"] for m in got["messages"]] == ids
        assert got["missed"] == 0 and got["cursor"] == 20
    assert first_room.answer(0, 100) == second_room.answer(0, 100)  # same bytes in both workers


def test_a_room_first_seen_late_is_loaded_with_exact_missed(workers):
    writer = workers(history=5)
    for n in range(12):
        writer.publish("late", "bob", "m%d" % n)
    newcomer = workers(history=5)
    room = newcomer.room("late", 2)
    got = answer(room, 2)
    assert [m["id"] for m in got["messages"]] == [8, 9, 10, 11, 12]
    assert got["missed"] == 5  # ids 3..7 are no longer retained
    assert "reset" not in got


def test_a_cursor_from_a_faster_worker_is_not_a_reset(workers):
    fast, slow = workers(), workers()
    slow.room("race", 0)
    slow.reader.kill()  # this worker's reader falls behind for good
    for n in range(3):
        fast.publish("race", "cy", "m%d" % n)
    room = slow.room("race", 3)
    got = answer(room, 3)
    assert "reset" not in got and got["cursor"] == 3 and room.last_id == 3


def test_a_cursor_from_the_future_is_a_reset(workers):
    bus = workers()
    bus.publish("future", "di", "hello")
    got = answer(bus.room("future", 99), 99)
    assert got["reset"] is True and got["cursor"] == 1


def test_a_redis_that_lost_its_data_resets_the_worker_copy(workers, redis_server):
    bus = workers()
    for n in range(4):
        bus.publish("wiped", "ed", "m%d" % n)
    room = bus.room("wiped", 0)
    wait_until(lambda: room.last_id == 4, 10.0, "the room's last id")
    redis_server.stop()
    shutil.rmtree(os.path.join(redis_server.workdir, "appendonlydir"))
    redis_server.__init__(redis_server.workdir, redis_server.port)  # same port, empty data
    wait_until(lambda: room.last_id == 0, 10.0, "the reader noticed the loss")
    bus.publish("wiped", "ed", "after")
    wait_until(lambda: room.last_id == 1, 10.0, "the room's last id")
    got = answer(bus.room("wiped", 4), 4)
    assert got["reset"] is True and [m["content"] for m in got["messages"]] == ["after"]


def test_the_app_on_the_redis_bus(redis_server):
    chattle.configure(chattle.Settings(history=50, redis=redis_server.url))
    try:
        wait_until(lambda: call_wsgi("GET", "/health").status == 200, 10.0, "health ok")
        assert call_wsgi("GET", "/health").json["bus"] == "redis"
        posted = call_wsgi("POST", "/rooms/app/msgs", body=json.dumps({"from": "fi", "content": "x"}),
                           headers={"Content-Type": "application/json"})
        assert posted.status == 201 and posted.json["id"] == 1
        polled = call_wsgi("GET", "/rooms/app/msgs", query="since=0&timeout=5")
        assert [m["content"] for m in polled.json["messages"]] == ["x"]
        # /health's "time" is the clock `ts` comes from: Redis TIME, read after the post
        assert call_wsgi("GET", "/health").json["time"] >= posted.json["ts"]
    finally:
        chattle.configure(chattle.Settings())


def test_redis_down_answers_503_and_health_degraded(redis_server):
    chattle.configure(chattle.Settings(history=50, redis=redis_server.url))
    try:
        wait_until(lambda: call_wsgi("GET", "/health").status == 200, 10.0, "health ok")
        redis_server.stop()
        posted = call_wsgi("POST", "/rooms/down/msgs", body=json.dumps({"from": "gu", "content": "x"}),
                           headers={"Content-Type": "application/json"})
        assert posted.status == 503 and posted.header("Retry-After")
        assert "error" in posted.json
        wait_until(lambda: call_wsgi("GET", "/health").status == 503, 10.0, "health degraded")
        assert call_wsgi("GET", "/health").json["status"] == "degraded"
        assert call_wsgi("GET", "/health").json["time"] is None
        polled = call_wsgi("GET", "/rooms/down/msgs", query="since=0&timeout=1")
        assert polled.status == 503 and polled.header("Retry-After")
    finally:
        chattle.configure(chattle.Settings())


def test_concurrent_first_polls_of_an_empty_room_are_all_answered(redis_server, start_chattle):
    """The first poll loads the room from Redis while the others wait for that load; it is
    answered (nothing there) and the empty room is dropped, as unused rooms are. Those
    waiting must then load it again, not answer 503 "the room could not be loaded"."""
    import gevent

    from harness.processes import get_json
    server = start_chattle(redis_url=redis_server.url)
    for attempt in range(5):
        room = "fresh-%d" % attempt
        polls = [gevent.spawn(get_json, "%s/rooms/%s/msgs" % (server.url, room), 10) for _ in range(40)]
        gevent.joinall(polls, timeout=30, raise_error=True)
        statuses = sorted(poll.value[0] for poll in polls)
        assert statuses == [200] * 40, [poll.value for poll in polls if poll.value[0] != 200][:3]


def test_a_room_whose_load_is_held_up_does_not_delay_another_room(workers):
    """The reader applies every room's posts; a room still loading on this worker (a slow
    Redis answer, a large history) must not hold up the posts of the others. Its load is
    held on an Event the test controls, so nothing here depends on timing."""
    import gevent
    from gevent.event import Event

    writer, worker = workers(), workers()
    worker.room("quick", 0)
    release = Event()
    syncing = []
    real_sync = worker._sync

    def held_sync(room_name, room):
        if room_name == "slow":
            syncing.append(room_name)
            release.wait()
        return real_sync(room_name, room)

    worker._sync = held_sync
    loading = gevent.spawn(worker.room, "slow", 0)
    try:
        wait_until(lambda: syncing, 10.0, "the slow room's load started")
        writer.publish("slow", "ann", "while it loads")
        writer.publish("quick", "bob", "not held up")
        quick = worker.rooms.get("quick")
        wait_until(lambda: quick.last_id == 1, 10.0, "the quick room's post, while the slow room loads")
        assert not release.is_set() and not loading.ready()
    finally:
        release.set()
    slow = loading.get(timeout=10)
    writer.publish("slow", "ann", "after the load")
    wait_until(lambda: slow.last_id == 2, 10.0, "both posts of the slow room")
    assert [m["content"] for m in answer(slow, 0)["messages"]] == ["while it loads", "after the load"]


def test_a_catch_up_that_meets_a_redis_error_tries_again(workers, redis_server):
    """After an outage every loaded room is fetched again in a greenlet of its own; a fetch
    that meets Redis still loading (or refusing) tries again, as the reader does, rather
    than leave the room's copy as it was (here: Redis lost the room, so it must reset)."""
    import gevent
    import redis

    worker = workers()
    for n in range(3):
        worker.publish("flaky", "ann", "m%d" % n)
    room = worker.room("flaky", 0)
    wait_until(lambda: room.last_id == 3, 10.0, "the room loaded")
    redis.Redis.from_url(redis_server.url).flushall()
    failures = []
    real_sync = worker._sync

    def flaky_sync(room_name, copy):
        if not failures:
            failures.append(room_name)
            raise redis.ConnectionError("Redis is loading")
        return real_sync(room_name, copy)

    worker._sync = flaky_sync
    worker.held_back["flaky"] = []
    gevent.spawn(worker._settle, "flaky", True)  # as the reader's _resume does after an outage
    wait_until(lambda: room.last_id == 0, 10.0, "the room reset after one failed fetch")
    assert failures == ["flaky"]
