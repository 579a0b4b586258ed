"""What no client can make a worker (or Redis) hold without bound, each bound a setting and
counted in real bytes: one poll answer's bytes, the answers held for clients that do not
read them, what a room costs, the rooms of a worker and the rooms of a Redis.

Real sockets on 127.0.0.1 and a real redis-server; every wait is on a condition under a
deadline, and every figure asserted is a count of bytes or of rooms.
"""

import gc
import socket
import tracemalloc

import gevent
import pytest

import chattle
import chattle_http
from clients import Raw, request, settle, stats
from harness.processes import get_json, post_json, wait_until
from test_hostile import WIDE, fill_room

FRAGMENT = len(chattle.encode({"id": 10, "from": "ann", "content": WIDE, "ts": 1764000000.123}))


def poll(server, path):
    status, body = get_json(server.url + path, timeout=30)
    assert status == 200, body
    return body


# -- one answer's bytes -----------------------------------------------------------------------

def test_an_answer_carries_at_most_max_answer_bytes_and_the_next_poll_the_rest(start_chattle):
    """20 messages of 8 KB against a bound of 3 of them: every answer holds 3 (the cursor its
    last), and polling on from each cursor gets every message once, none missed."""
    server = start_chattle(env={"CHATTLE_MAX_ANSWER_BYTES": str(int(3.5 * FRAGMENT))})  # ts vary in length
    fill_room(server.port, "wide", 20, WIDE)
    since, seen = 0, []
    for _answer in range(7):
        body = poll(server, "/rooms/wide/msgs?since=%d&limit=1000&timeout=0" % since)
        assert len(body["messages"]) == (3 if since < 18 else 2) and body["missed"] == 0
        assert body["cursor"] == body["messages"][-1]["id"]
        seen += [message["id"] for message in body["messages"]]
        since = body["cursor"]
    assert seen == list(range(1, 21))
    newest = poll(server, "/rooms/wide/msgs?limit=1000")  # the newest: the cursor stays the last id
    assert [message["id"] for message in newest["messages"]] == [18, 19, 20] and newest["cursor"] == 20


def test_an_answer_always_carries_one_message(start_chattle):
    server = start_chattle(env={"CHATTLE_MAX_ANSWER_BYTES": "100"})
    fill_room(server.port, "wide", 2, WIDE)
    body = poll(server, "/rooms/wide/msgs?since=0&timeout=0")
    assert [message["id"] for message in body["messages"]] == [1] and body["cursor"] == 1


# -- the answers held for clients that do not read them ---------------------------------------

@pytest.mark.parametrize("kind", ["python", "gunicorn"])
def test_held_answers_stay_within_max_unsent_bytes_the_longest_held_dropped(start_chattle, kind):
    """Six clients with tiny receive windows ask for distinct 8 MB answers (more than the
    kernel's buffers take on loopback, about 3 MB) and read nothing: the worker holds two
    (16 MB against a bound of 20 MB), dropping the connection that held its answer longest
    for each new one. The two held are then read whole, and nothing is held any more."""
    room, messages, limit = "big", 1000, 990
    server = start_chattle(gunicorn=kind == "gunicorn", env={
        "CHATTLE_HISTORY": str(messages), "CHATTLE_MAX_ANSWER_BYTES": str(16 << 20),
        "CHATTLE_MAX_UNSENT_BYTES": str(20 << 20), "CHATTLE_SEND_TIMEOUT": "60"})
    fill_room(server.port, room, messages, WIDE)
    sizes = []  # of the answer to each cursor below (the ts differ in length)
    reader = Raw(server.port)
    try:
        for number in range(6):
            reader.sock.sendall(request("GET", "/rooms/%s/msgs?since=%d&limit=%d&timeout=0" % (room, number, limit)))
            _status, headers, _body = reader.answer(60)
            sizes.append(int(headers["content-length"]))
    finally:
        reader.close()
    clients = []
    try:
        for number in range(6):
            client = Raw(server.port, receive_buffer=4096)
            client.sock.sendall(request("GET", "/rooms/%s/msgs?since=%d&limit=%d" % (room, number, limit)))
            clients.append(client)
            # bytes held (the two newest answers), connections dropped
            expected = (sum(sizes[max(0, number - 1):number + 1]), max(0, number - 1))
            wait_until(lambda expected=expected: (stats(server)["unsent_bytes"], stats(server)["unsent_dropped"])
                       == expected, 30, "held and dropped: %r" % (expected,))
        for client in clients[:4]:  # the four held longest were dropped, their answers cut short
            assert client.closed_by_server(30)
        for number, client in enumerate(clients[4:], 4):
            status, _headers, body = client.answer(60)
            assert status == 200 and body["cursor"] == number + limit
        wait_until(lambda: stats(server)["unsent_bytes"] == 0, 30, "nothing held once read")
    finally:
        for client in clients:
            client.close()


def test_connections_sharing_an_answer_hold_it_once_and_no_copy(app_state):
    """Twenty connections that do not read are sent the same cached answer of 256 KB: the
    worker holds it once, not a head-and-body copy per connection (5 MB)."""
    chattle.configure(chattle.Settings(history=100))
    for _ in range(64):
        chattle.get_bus().publish("shared", "ann", WIDE)
    handler_class = chattle.pywsgi_handler_class()
    server = gevent.pywsgi.WSGIServer(("127.0.0.1", 0), chattle.app.wsgi, handler_class=handler_class, log=None)
    pairs, greenlets = [], []
    try:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(20):
            ours, theirs = socket.socketpair()
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            theirs.sendall(request("GET", "/rooms/shared/msgs?limit=64"))
            pairs.append((ours, theirs))
            greenlets.append(gevent.spawn(handler_class(ours, ("127.0.0.1", 1), server).handle))
        settle(lambda: handler_class.deadlines.watched() == 20, "every answer held")
        held = tracemalloc.get_traced_memory()[0] - before
        answer = chattle.rooms.get("shared").answer(None, 64)
        assert len(answer) > 200 * 1024
        assert held < 2 * len(answer), "%d bytes held for 20 connections sharing one answer" % held
        assert chattle_http.unsent_bytes() == len(answer)
    finally:
        tracemalloc.stop()
        for _ours, theirs in pairs:
            theirs.close()
        gevent.joinall(greenlets, timeout=10)
    assert chattle_http.unsent_bytes() == 0


# -- what a room costs, and how many a worker holds -------------------------------------------

def test_a_rooms_fixed_cost_is_what_it_really_costs():
    """1,000 rooms of one message each, made as a post makes them: what tracemalloc counts is
    what retained_bytes counts, within 15 %, whatever the names' length."""
    for name_length in (4, 64):
        rooms = chattle.Rooms(10)
        bus = chattle.MemoryBus(rooms)
        raw_names = [(b"r%0*d" % (name_length - 1, number)) for number in range(1000)]
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for raw in raw_names:
                bus.publish(raw.decode(), "ann", "hello")  # the name, as a request decodes it
            gc.collect()
            traced = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        counted = rooms.retained_bytes
        assert abs(counted - traced) <= 0.15 * traced, (name_length, counted, traced)


def test_a_worker_holds_at_most_max_rooms_forgetting_the_least_recently_active(start_chattle):
    server = start_chattle(env={"CHATTLE_MAX_ROOMS": "10"})
    for number in range(30):
        assert post_json(server.url + "/rooms/r%d/msgs" % number, {"from": "ann", "content": "hi"})[0] == 201
        assert stats(server)["rooms"] <= 10
    body = poll(server, "/rooms/r0/msgs?since=1&timeout=0")  # forgotten: its client is told
    assert body.get("reset") is True
    body = poll(server, "/rooms/r29/msgs?since=0&timeout=0")
    assert [message["id"] for message in body["messages"]] == [1]


def test_a_new_room_is_refused_503_only_while_every_room_is_in_use(start_chattle):
    server = start_chattle(env={"CHATTLE_MAX_ROOMS": "3"})
    polls = []
    try:
        for number in range(3):  # a poll waits on each of the three rooms
            client = Raw(server.port)
            client.sock.sendall(request("GET", "/rooms/held%d/msgs?since=0&timeout=60" % number))
            polls.append(client)
        wait_until(lambda: stats(server)["waiters"] == 3, 30, "three polls held")
        status, body = post_json(server.url + "/rooms/new/msgs", {"from": "ann", "content": "hi"})
        assert status == 503 and "maximum of 3 rooms" in body["error"]
        client = Raw(server.port)
        try:
            client.sock.sendall(request("GET", "/rooms/other/msgs?timeout=0"))
            status, headers, body = client.answer()
            assert status == 503 and headers["retry-after"] == "1" and "error" in body
        finally:
            client.close()
        assert post_json(server.url + "/rooms/held0/msgs", {"from": "ann", "content": "hi"})[0] == 201
    finally:
        for client in polls:
            client.close()
    wait_until(lambda: post_json(server.url + "/rooms/new/msgs", {"from": "ann", "content": "hi"})[0] == 201,
               30, "a new room once the polls are gone")
    log = open(server.log_path, "rb").read()
    assert b"Traceback" not in log


def test_a_poll_refused_429_leaves_no_room_behind(start_chattle):
    """A room only a refused poll named is nobody's: kept, it could never be forgotten (it
    has no message), and would take a place under --max-rooms for good."""
    server = start_chattle(env={"CHATTLE_MAX_POLLS_PER_ADDRESS": "1"})
    held = Raw(server.port)
    try:
        held.sock.sendall(request("GET", "/rooms/held/msgs?since=0&timeout=60"))
        wait_until(lambda: stats(server)["waiters"] == 1, 30, "one poll held")
        for number in range(5):
            status, _body = get_json(server.url + "/rooms/made-up%d/msgs?since=0&timeout=60" % number)
            assert status == 429
        assert stats(server)["rooms"] == 1
    finally:
        held.close()


# -- the rooms of a Redis -------------------------------------------------------------------------

def test_redis_holds_at_most_max_bus_rooms_until_the_least_recent_expires(start_chattle, redis_server):
    import redis

    ttl = 3
    server = start_chattle(redis_url=redis_server.url, env={"CHATTLE_MAX_BUS_ROOMS": "3",
                                                            "CHATTLE_ROOM_TTL": str(ttl)})
    client = redis.Redis.from_url(redis_server.url)
    try:
        for number in range(3):
            assert post_json(server.url + "/rooms/r%d/msgs" % number, {"from": "ann", "content": "hi"})[0] == 201
        status, body = post_json(server.url + "/rooms/r3/msgs", {"from": "ann", "content": "hi"})
        assert status == 503 and "maximum of 3 rooms" in body["error"]
        assert not client.exists("chattle:room:r3:last")  # nothing was written, no id taken
        assert post_json(server.url + "/rooms/r1/msgs", {"from": "ann", "content": "again"})[0] == 201
        assert client.zcard("chattle:rooms") == 3
        # once the rooms' keys expire, their places in the set go to new rooms
        wait_until(lambda: post_json(server.url + "/rooms/r3/msgs", {"from": "ann", "content": "hi"})[0] == 201,
                   ttl + 15, "a new room once the oldest expired")
        assert poll(server, "/rooms/r3/msgs?since=0&timeout=0")["cursor"] == 1
        assert client.zcard("chattle:rooms") <= 3
    finally:
        client.close()


def test_a_post_to_a_known_room_costs_three_redis_commands_more(start_chattle, redis_server):
    """What the bound costs per post, from Redis' own command counts: TIME, ZSCORE and ZADD."""
    import redis

    server = start_chattle(redis_url=redis_server.url)
    assert post_json(server.url + "/rooms/counted/msgs", {"from": "ann", "content": "first"})[0] == 201
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.config_resetstat()
        for _ in range(10):
            assert post_json(server.url + "/rooms/counted/msgs", {"from": "ann", "content": "hi"})[0] == 201
        counts = {name: figures["calls"] for name, figures in client.info("commandstats").items()}
    finally:
        client.close()
    assert counts.get("cmdstat_zscore") == counts.get("cmdstat_zadd") == 10
    assert counts.get("cmdstat_time") == 20
