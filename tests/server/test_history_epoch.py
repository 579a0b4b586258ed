"""A history that starts again is never mistaken for the old one.

Every answer names the history its ids belong to (`epoch`); a room whose history starts
over (Redis lost it, the room expired, the worker evicted it) wakes its held polls with
`reset`, and a cursor of the old history is told `reset`, never given a reused id as news.
"""

import json

import gevent
import pytest
import redis

import chattle
from clients import held_poll, wait_for_waiters
from harness.processes import RedisServer, get_json, post_json, wait_until


def answer(room, since, epoch=None, limit=100):
    return json.loads(room.answer(since, limit, False, epoch))


@pytest.fixture
def worker(redis_server):
    """One Redis bus with its own rooms, as a worker has; what it was given is closed after."""
    made = []

    def make(history=50, room_ttl=7 * 24 * 3600):
        bus = chattle.RedisBus(chattle.Rooms(history), redis_server.url, history, room_ttl)
        made.append(bus)
        wait_until(lambda: bus.reader_ok, 10.0, "the bus's reader connected")
        return bus

    yield make
    for bus in made:
        bus.close()


def hold(bus, room_name, since, epoch=None, timeout=30):
    """A poll held on the bus's room as the route holds one: (the answer, decoded) later."""
    def poll():
        room = bus.room(room_name, since, epoch)
        parked_in = epoch if epoch is not None else room.epoch
        held = room.wait_for_news(since, timeout, parked_in)
        return json.loads(room.answer(since, 100, held, parked_in))
    return gevent.spawn(poll)


def test_every_answer_names_its_history_and_a_post_starts_one(wsgi):
    empty = json.loads(wsgi("GET", "/rooms/e/msgs").body)
    assert empty["epoch"] is None  # no history yet
    first = json.loads(wsgi("POST", "/rooms/e/msgs", b'{"from":"a","content":"x"}',
                            {"Content-Type": "application/json"}).body)
    assert first["epoch"] and json.loads(wsgi("GET", "/rooms/e/msgs").body)["epoch"] == first["epoch"]
    held = json.loads(wsgi("GET", "/rooms/e/msgs", query="since=1&timeout=0&epoch=" + first["epoch"]).body)
    assert held["epoch"] == first["epoch"] and "reset" not in held


@pytest.mark.parametrize("epoch", ["", "a" * 33, "a-b", "%00", "\u00e9"])
def test_an_epoch_that_no_answer_gave_is_refused_or_ignored(wsgi, epoch):
    got = wsgi("GET", "/rooms/q/msgs", query="since=0&timeout=0&epoch=" + epoch)
    if epoch == "":
        assert got.status == 200  # an empty one names no history
    else:
        assert got.status == 400 and "epoch" in got.json["error"]


def test_an_evicted_room_posted_to_again_tells_an_old_cursor_reset():
    rooms = chattle.Rooms(50, max_retained_bytes=20000)
    bus = chattle.MemoryBus(rooms)
    old = [bus.publish("gone", "ann", "old %d" % n) for n in range(4)]
    for n in range(200):  # other rooms' posts push the idle room out of the byte bound
        bus.publish("other%d" % n, "bob", "x" * 100)
    assert "gone" not in rooms.by_name and rooms.forgotten >= 1  # /stats rooms_forgotten
    new = [bus.publish("gone", "ann", "new %d" % n) for n in range(5)]
    assert new[0]["id"] == 1 and new[0]["epoch"] != old[0]["epoch"]
    got = answer(bus.room("gone", 4, old[0]["epoch"]), 4, old[0]["epoch"])
    assert got["reset"] is True and [m["content"] for m in got["messages"]] == ["new %d" % n for n in range(5)]
    assert got["epoch"] == new[0]["epoch"] and got["cursor"] == 5


def test_a_wiped_redis_tells_a_held_poll_and_an_old_cursor_reset(worker, redis_server):
    bus = worker()
    epoch = [bus.publish("wiped", "ann", "old %d" % n) for n in range(4)][0]["epoch"]
    held = hold(bus, "wiped", 4)
    wait_until(lambda: bus.rooms.waiters == 1, 10.0, "the poll is held")
    redis.Redis.from_url(redis_server.url).flushall()  # a restart without persistence, at once
    new = [bus.publish("wiped", "ann", "new %d" % n) for n in range(5)]
    assert [m["id"] for m in new] == [1, 2, 3, 4, 5] and new[0]["epoch"] != epoch
    got = held.get(timeout=30)
    assert got["reset"] is True, got  # not message 5 alone, as if 1 to 4 had never been
    # the held poll may be woken before some of the new posts: it goes on from the new history
    wait_until(lambda: bus.rooms.by_name["wiped"].last_id == 5, 10.0, "the worker read the new posts")
    rest = answer(bus.room("wiped", got["cursor"], got["epoch"]), got["cursor"], got["epoch"])
    assert [m["content"] for m in got["messages"] + rest["messages"]] == ["new %d" % n for n in range(5)]
    # a client that comes back with a cursor of the old history is told too
    again = answer(bus.room("wiped", 4, epoch), 4, epoch)
    assert again["reset"] is True and [m["id"] for m in again["messages"]] == [1, 2, 3, 4, 5]


def test_a_room_that_expired_in_redis_starts_a_new_history(worker, redis_server):
    bus = worker(room_ttl=1)
    epoch = [bus.publish("brief", "ann", "old %d" % n) for n in range(3)][0]["epoch"]
    held = hold(bus, "brief", 3)
    wait_until(lambda: bus.rooms.waiters == 1, 10.0, "the poll is held")
    direct = redis.Redis.from_url(redis_server.url)
    wait_until(lambda: not direct.exists(*bus.room_keys("brief")), 20.0, "the room's keys expired")
    posted = bus.publish("brief", "ann", "new")
    assert posted["id"] == 1 and posted["epoch"] != epoch
    got = held.get(timeout=30)
    assert got["reset"] is True and got["epoch"] == posted["epoch"], got
    assert [m["content"] for m in got["messages"]] == ["new"]


def test_a_room_whose_last_id_alone_was_evicted_starts_a_new_history(worker, redis_server):
    """A Redis under maxmemory may evict one key of a room: its stream's ids would refuse
    the restarted count, and every post of the room would fail."""
    bus = worker()
    epoch = [bus.publish("half", "ann", "old %d" % n) for n in range(3)][0]["epoch"]
    redis.Redis.from_url(redis_server.url).delete(bus.room_keys("half")[0])
    posted = bus.publish("half", "ann", "new")
    assert posted["id"] == 1 and posted["epoch"] != epoch
    got = answer(bus.room("half", 3, epoch), 3, epoch)
    assert got["reset"] is True and [m["content"] for m in got["messages"]] == ["new"]


def test_a_redis_restart_under_a_held_poll_loses_nothing_silently(start_chattle, tmp_path):
    """The reproduction end to end: `python chattle.py --redis` on a Redis that keeps
    nothing on disk; a poll held after id 4; Redis restarts; five posts. The poll is told
    `reset`, and from its answer's cursor and epoch it gets all five."""
    (tmp_path / "redis").mkdir()
    store = RedisServer(workdir=str(tmp_path / "redis"), appendonly=False)
    try:
        server = start_chattle(redis_url=store.url)
        for n in range(4):
            assert post_json(server.url + "/rooms/x/msgs", {"from": "ann", "content": "old %d" % n})[0] == 201
        held = gevent.spawn(held_poll, server.port, "/rooms/x/msgs?since=4&timeout=60")
        wait_for_waiters(server, 1)
        store.stop()
        store.__init__(store.workdir, store.port, appendonly=False)  # same port, nothing kept
        posted = []
        for n in range(5):
            def accepted(n=n):
                status, body = post_json(server.url + "/rooms/x/msgs", {"from": "ann", "content": "new %d" % n})
                if status == 201:
                    posted.append(body)
                return status == 201
            wait_until(accepted, 30.0, "post %d accepted once Redis is back" % n)
        assert [p["id"] for p in posted] == [1, 2, 3, 4, 5]
        status, _headers, got = held.get(timeout=60)
        assert status == 200 and got["reset"] is True, got
        received = [m["content"] for m in got["messages"]]
        if got["cursor"] < 5:
            status, rest = get_json("%s/rooms/x/msgs?since=%d&epoch=%s&timeout=0"
                                    % (server.url, got["cursor"], got["epoch"] or ""))
            assert "reset" not in rest, rest
            received += [m["content"] for m in rest["messages"]]
        assert received == ["new %d" % n for n in range(5)]
    finally:
        store.stop()


def test_a_message_not_written_by_chattle_in_a_room_stream_is_told_as_missed(worker, redis_server):
    """Anything with access to Redis may XADD to a room's stream: a load meets it and goes on,
    the ids up to it told as missed, never a 500 nor a room that answers 503 for good."""
    poster = worker()
    for n in range(2):
        poster.publish("odd", "ann", "m%d" % n)
    direct = redis.Redis.from_url(redis_server.url)
    last_key, stream_key = poster.room_keys("odd")
    direct.xadd(stream_key, {"x": "not a message"}, id="3-0")
    direct.incr(last_key)
    assert poster.publish("odd", "ann", "after")["id"] == 4
    fresh = worker()
    got = answer(fresh.room("odd", 0), 0)
    assert got["missed"] == 3 and [m["content"] for m in got["messages"]] == ["after"], got
    assert fresh.reader_state()["malformed_entries"] == 1
