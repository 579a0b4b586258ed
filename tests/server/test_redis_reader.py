"""The Redis bus's reader and room loading against a real redis-server: nothing is lost
and nothing stops for good, whatever the global stream holds or however far behind the
reader falls; a failed load or catch-up keeps nothing, and a cursor from the future
costs Redis no fetch.

Two RedisBus objects with their own Rooms stand for two workers, as in test_redis_bus.py;
one test runs a real `python chattle.py --redis` process and stops it with SIGSTOP.
"""

import json
import signal

import gevent
import pytest
import redis
from gevent.event import Event

import chattle
from clients import GENEROUS, HttpConnection, call_wsgi, stats, wait_for_waiters
from harness.processes import wait_until

POSTS = chattle.RedisBus.POSTS


@pytest.fixture
def workers(redis_server):
    """Buses on one redis-server, each with its own rooms, as workers would be."""
    made = []

    def make(history=50, max_retained_bytes=None):
        bus = chattle.RedisBus(chattle.Rooms(history, max_retained_bytes), redis_server.url, history)
        made.append(bus)
        wait_until(lambda: bus.healthy() and bus.reader_ok, 10.0, "bus connected")
        return bus

    yield make
    for bus in made:
        bus.close()


@pytest.fixture
def raw(redis_server):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


def contents(room):
    return [m["content"] for m in json.loads(room.answer(0, 100))["messages"]]


def test_malformed_entries_are_skipped_and_the_reader_goes_on(workers, raw):
    writer, worker = workers(), workers()
    room = worker.room("hall", 0)
    raw.xadd(POSTS, {"r": "hall"})  # no id
    raw.xadd(POSTS, {"r": "hall", "i": "abc", "f": "ann", "c": "x", "t": "1.5"})  # an id that is no number
    raw.xadd(POSTS, {"r": "hall", "i": "1", "f": "ann", "c": "x", "t": "soon"})  # a ts that is no time
    raw.xadd(POSTS, {"r": b"\xff", "i": "1", "f": "ann", "c": "x", "t": "1.5"})  # not UTF-8: another room
    writer.publish("hall", "bob", "after them")
    wait_until(lambda: room.last_id == 1, 10.0, "the post after the malformed entries")
    assert contents(room) == ["after them"]
    state = worker.reader_state()
    # one fetch of every room: the reader's start; none since (no reconnect, no restart)
    assert (state["state"], state["malformed_entries"], state["restarts"], state["reconnects"], state["resyncs"]) \
        == ("ok", 3, 0, 0, 1)
    assert "malformed entry" in state["last_error"]
    assert worker.posts_received == 2 and worker.posts_received_for_rooms_not_held == 1


def test_an_unexpected_error_restarts_the_reader_which_loses_nothing(workers):
    writer, worker = workers(), workers()
    room = worker.room("boom", 0)
    real_apply = worker._apply
    failures = []

    def failing_apply(fields):
        if not failures:
            failures.append(fields["c"])
            raise RuntimeError("a bug in applying an entry " + "x" * 1000)
        return real_apply(fields)

    worker._apply = failing_apply
    writer.publish("boom", "ann", "the one it failed on")
    wait_until(lambda: room.last_id == 1, 10.0, "the failed entry's post, fetched when the reader started again")
    writer.publish("boom", "ann", "read after the restart")
    wait_until(lambda: room.last_id == 2, 10.0, "a post after the restart")
    assert contents(room) == ["the one it failed on", "read after the restart"]
    state = worker.reader_state()
    assert (failures, state["state"], state["restarts"], state["resyncs"]) == (["the one it failed on"], "ok", 1, 2)
    assert state["last_error"].startswith("RuntimeError: a bug") and len(state["last_error"]) == worker.ERROR_CHARS


def test_stats_and_health_report_the_reader(redis_server, raw):
    chattle.configure(chattle.Settings(history=50, redis=redis_server.url))
    try:
        wait_until(lambda: call_wsgi("GET", "/health").status == 200, 10.0, "health ok")
        raw.xadd(POSTS, {"r": "x"})
        wait_until(lambda: call_wsgi("GET", "/stats").json["bus_reader"]["malformed_entries"] == 1, 10.0,
                   "the malformed entry counted")
        health = call_wsgi("GET", "/health")
        assert health.status == 200 and health.json["bus_reader"]["state"] == "ok"
        assert health.json["bus_reader"]["malformed_entries"] == 1
    finally:
        chattle.configure(chattle.Settings())


def readers_waiting(raw):
    """Every reader (the writer's, the worker's) is waiting in XREAD: none is between a
    reply and its next read."""
    clients = raw.client_list()
    readers = [client for client in clients if client["cmd"] == "xread"]
    return len(readers) >= 2 and all("b" in client["flags"] for client in readers) \
        and not any(client["cmd"].startswith("xinfo") for client in clients)


def stopped(pid):
    with open("/proc/%d/stat" % pid) as stat:
        return stat.read().rpartition(")")[2].split()[0] == "T"


def test_a_reader_stalled_past_the_trim_of_the_global_stream_wakes_its_held_poll(workers, raw, redis_server,
                                                                                start_chattle):
    """A worker stopped while its room's post went by and was trimmed from the global
    stream: once it runs again, its reader reads on past the trimmed entries, notices it,
    and fetches the room, so the poll held there is answered with the post."""
    writer = workers()
    server = start_chattle(redis_url=redis_server.url)
    writer.publish("quiet", "ann", "before")
    poll = HttpConnection(server.port)
    try:
        poll.send("GET", "/rooms/quiet/msgs?since=1&timeout=20")
        wait_for_waiters(server, 1)
        wait_until(lambda: stats(server)["bus_posts_received"] == 1, GENEROUS, "the worker's reader read the post")
        wait_until(lambda: readers_waiting(raw), GENEROUS, "every reader waiting in XREAD")
        server.signal(signal.SIGSTOP)
        try:
            wait_until(lambda: stopped(server.pid), GENEROUS, "the worker stopped")
            writer.publish("elsewhere", "bob", "the answer its XREAD is given")
            writer.publish("quiet", "ann", "trimmed before the worker read it")
            raw.xtrim(POSTS, maxlen=0)
        finally:
            server.signal(signal.SIGCONT)
        status, _headers, body = poll.receive()
    finally:
        poll.close()
    assert status == 200 and [m["content"] for m in body["messages"]] == ["trimmed before the worker read it"]
    reader = stats(server)["bus_reader"]
    assert (reader["state"], reader["resyncs"], reader["restarts"], reader["reconnects"]) == ("ok", 2, 0, 0)


def test_a_busy_reader_looks_for_a_trim_at_most_every_trim_check_every(workers, raw):
    """Between two looks less than TRIM_CHECK_EVERY apart (and after batches short of
    READ_BATCH) no trim can pass the reader: it asks no XINFO. Here that time is made too
    long to pass, so none is asked however many reads."""
    writer, worker = workers(), workers()
    worker.TRIM_CHECK_EVERY = 3600.0
    room = worker.room("busy", 0)
    raw.config_resetstat()
    for number in range(20):
        writer.publish("busy", "ann", "m%d" % number)
    wait_until(lambda: room.last_id == 20, 10.0, "every post read")
    assert command_calls(raw, "xinfo|stream") == 0 and command_calls(raw, "xread") >= 1


def test_polls_on_new_rooms_while_redis_is_down_keep_no_room(redis_server):
    chattle.configure(chattle.Settings(history=50, redis=redis_server.url))
    try:
        wait_until(lambda: call_wsgi("GET", "/health").status == 200, 10.0, "health ok")
        redis_server.stop()
        for number in range(20):
            assert call_wsgi("GET", "/rooms/new%d/msgs" % number, query="since=0&timeout=1").status == 503
            assert call_wsgi("GET", "/rooms/later%d/msgs" % number, query="since=7&timeout=1").status == 503
        assert call_wsgi("GET", "/stats").json["rooms"] == 0
        assert not chattle.bus.loaded
    finally:
        chattle.configure(chattle.Settings())


def command_calls(client, command):
    return client.info("commandstats").get("cmdstat_" + command, {}).get("calls", 0)


def test_a_cursor_from_the_future_costs_redis_no_fetch(workers, raw):
    bus = workers()
    bus.publish("future", "di", "hello")
    bus.room("future", 0)
    raw.config_resetstat()
    for _ in range(100):
        got = json.loads(bus.room("future", 10 ** 9).answer(10 ** 9, 100))
        assert got["reset"] is True and got["cursor"] == 1
    assert (command_calls(raw, "xrevrange"), command_calls(raw, "mget")) == (0, 100)
    # nor does a cursor of a history the room no longer has (or never had)
    raw.config_resetstat()
    for _ in range(100):
        got = json.loads(bus.room("future", 1, "not-its-epoch").answer(1, 100, epoch="not-its-epoch"))
        assert got["reset"] is True and got["cursor"] == 1
    assert (command_calls(raw, "xrevrange"), command_calls(raw, "mget")) == (0, 100)
    # concurrent ones share one look at Redis (held up here, as a slow Redis would)
    raw.config_resetstat()
    release = Event()
    real_head = bus._head

    def slow_head(room_name):
        release.wait()
        return real_head(room_name)

    bus._head = slow_head
    polls = [gevent.spawn(bus.room, "future", 10 ** 9) for _ in range(50)]
    gevent.sleep(0)  # every poll has started: one waits in the GET, the others for it
    release.set()
    gevent.joinall(polls, timeout=GENEROUS, raise_error=True)
    assert all(poll.value is polls[0].value for poll in polls)
    assert (command_calls(raw, "xrevrange"), command_calls(raw, "mget")) == (0, 1)
    # a cursor another worker handed out is still caught up with
    workers().publish("future", "di", "from another worker")
    got = json.loads(bus.room("future", 2).answer(2, 100))
    assert "reset" not in got and got["cursor"] == 2


def test_a_room_forgotten_while_it_is_fetched_leaves_the_retained_bytes_exact(workers):
    """The worker's bound sheds a room while a fetch of it is under way: what that fetch
    adds to the room it no longer holds is counted nowhere."""
    writer = workers()
    worker = workers(max_retained_bytes=1000)
    rooms = worker.rooms
    for number in range(3):
        writer.publish("old", "ann", "m%d" % number)
    old = worker.room("old", 0)
    worker.reader.kill()  # the fetch below, not the reader, brings the room's next posts
    # a fetch the reader started (its start, a trim check) ends first: only ours is held
    wait_until(lambda: not worker.held_back, GENEROUS, "no fetch of the reader's under way")
    for number in range(3, 5):
        writer.publish("old", "ann", "m%d" % number)
    fetched, release = Event(), Event()
    real_fetch = worker._fetch
    ours = []

    def held_fetch(room_name):
        answer = real_fetch(room_name)
        if gevent.getcurrent() in ours:
            fetched.set()
            release.wait()
        return answer

    worker._fetch = held_fetch
    worker.held_back["old"] = []
    settling = gevent.spawn(worker._settle, "old", True)  # as a resume does
    ours.append(settling)
    assert fetched.wait(GENEROUS), "the settle never fetched the room"
    worker._fetch = real_fetch
    worker.room("big", 0)
    for _ in range(100):  # a few posts are enough to outgrow the bound
        if "old" not in rooms.by_name:
            break
        worker.publish("big", "bob", "x" * 100)
    release.set()
    settling.join(GENEROUS)
    assert settling.dead and old.last_id == 5  # the fetch did fill the room it no longer holds
    held = list(rooms.by_name.values())
    # each room held counts its own cost besides its messages' (Rooms.room_cost)
    assert rooms.retained_bytes == sum(room.retained_bytes + rooms.room_cost(room.name) for room in held)
    assert sum(room.retained_bytes for room in held) == sum(
        len(fragment) + chattle.Room.MESSAGE_OVERHEAD for room in held for _id, fragment in room.messages)
