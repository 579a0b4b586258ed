"""A post's outcome is never ambiguous, and a post sent again with its Idempotency-Key is
posted once: on the in-memory bus in process, on the Redis bus with real redis-server and
real Chattle processes (a post held up in a stopped Redis is the unknown outcome).

Every wait is on a condition under a deadline; nothing here asserts how fast it went.
"""

import http.client
import json
import signal

import pytest
import redis

import chattle
from clients import GENEROUS, Raw, call_wsgi
from clients import request as raw_request
from harness.processes import get_json, wait_until

JSON = {"Content-Type": "application/json"}


def post(room, content, key=None, sender="ann"):
    """A post in process (the app as configured now), with its key if given."""
    headers = dict(JSON, **({"Idempotency-Key": key} if key is not None else {}))
    return call_wsgi("POST", "/rooms/%s/msgs" % room, json.dumps({"from": sender, "content": content}), headers)


def post_to(server, room, content, key=None, timeout=GENEROUS):
    """(status, body, Retry-After) of one post to a real server, on a connection of its own."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    headers = dict(JSON, Connection="close", **({"Idempotency-Key": key} if key is not None else {}))
    try:
        connection.request("POST", "/rooms/%s/msgs" % room, json.dumps({"from": "ann", "content": content}), headers)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read()), answer.getheader("Retry-After")
    finally:
        connection.close()


def contents(server, room):
    status, body = get_json("%s/rooms/%s/msgs?since=0&timeout=0" % (server.url, room))
    assert status == 200, body
    return [(message["id"], message["content"]) for message in body["messages"]]


# -- the in-memory bus --------------------------------------------------------------------------

def test_a_post_sent_again_with_its_key_is_answered_as_the_first_and_not_posted(wsgi):
    first = post("keyed", "hello", "k-1")
    again = post("keyed", "hello", "k-1")
    assert first.status == again.status == 201
    assert again.json == first.json == {"room": "keyed", "id": 1, "ts": first.json["ts"], "epoch": first.json["epoch"]}
    assert post("keyed", "hello", "k-2").json["id"] == 2  # another key is another post
    assert post("keyed", "hello").json["id"] == 3 and post("keyed", "hello").json["id"] == 4  # no key: each posts
    assert post("other", "hello", "k-1").json["id"] == 1  # the same key in another room posts anew
    polled = call_wsgi("GET", "/rooms/keyed/msgs", query="since=0&timeout=0").json
    assert [message["id"] for message in polled["messages"]] == [1, 2, 3, 4]


@pytest.mark.parametrize("key", ["", "x" * 65, "two words", "tab\there", "caf\u00e9", "del\x7f"])
def test_an_idempotency_key_that_is_not_1_to_64_visible_ascii_characters_is_400(wsgi, key):
    answer = post("badkey", "hello", key)
    assert answer.status == 400 and answer.header("Content-Type").startswith("application/json")
    assert "Idempotency-Key" in answer.json["error"]
    assert call_wsgi("GET", "/rooms/badkey/msgs", query="since=0&timeout=0").json["messages"] == []


def test_a_key_of_other_bytes_on_the_wire_is_a_json_400(start_chattle):
    server = start_chattle()
    for key in ("caf\u00e9", "x" * 65, "a b"):  # sent as latin-1 bytes
        connection = Raw(server.port)
        try:
            connection.sock.sendall(raw_request("POST", "/rooms/wire/msgs", [
                "Content-Type: application/json", "Content-Length: 29", "Idempotency-Key: " + key],
                b'{"from": "a", "content": "b"}'))
            status, _headers, body = connection.answer()
        finally:
            connection.close()
        assert status == 400 and "Idempotency-Key" in body["error"], (key, status, body)
    assert contents(server, "wire") == []


def test_the_widest_keys_are_taken(wsgi):
    for key in ("!", "~" * 64, "".join(chr(c) for c in range(0x21, 0x61))):
        first = post("widest", key, key)
        assert first.status == 201 and post("widest", key, key).json == first.json


def test_the_memory_bus_remembers_its_bound_of_keys_oldest_dropped_first(app_state):
    chattle.configure(chattle.Settings(idempotency_keys=2))
    assert [post("bound", "m", key).json["id"] for key in ("a", "b", "c")] == [1, 2, 3]
    assert len(chattle.get_bus().posted_by_key) == 2
    assert post("bound", "m", "c").json["id"] == 3  # still remembered
    assert post("bound", "m", "a").json["id"] == 4  # the oldest was dropped: posted again


def test_a_key_is_forgotten_once_its_window_is_over(app_state):
    chattle.configure(chattle.Settings(idempotency_seconds=60))
    assert post("window", "m", "w").json["id"] == 1
    table = chattle.get_bus().posted_by_key
    message_id, ts, epoch, lapses = table["window", "w"]
    assert 59 <= lapses - chattle.time.monotonic() <= 60
    table["window", "w"] = (message_id, ts, epoch, chattle.time.monotonic())  # as if the window were over
    assert post("window", "m", "w").json["id"] == 2
    assert list(table) == [("window", "w")]


def test_the_window_and_the_bound_are_settings():
    for name in ("idempotency_seconds", "idempotency_keys"):
        with pytest.raises(SystemExit, match="at least 1"):
            chattle.Settings(**{name: 0})
    settings = chattle.Settings.from_environ({"CHATTLE_IDEMPOTENCY_SECONDS": "30", "CHATTLE_IDEMPOTENCY_KEYS": "7"})
    assert (settings.idempotency_seconds, settings.idempotency_keys) == (30, 7)


# -- the Redis bus ----------------------------------------------------------------------------------

def test_a_key_holds_across_two_servers_on_one_redis(redis_server, start_chattle):
    first = start_chattle(redis_url=redis_server.url, env={"CHATTLE_IDEMPOTENCY_SECONDS": "120"})
    second = start_chattle(redis_url=redis_server.url, env={"CHATTLE_IDEMPOTENCY_SECONDS": "120"})
    data = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert post_to(first, "shared", "unkeyed")[0] == 201
    assert sorted(data.keys("chattle:*")) == ["chattle:posts", "chattle:room:shared:epoch", "chattle:room:shared:last",
                                              "chattle:room:shared:stream",
                                              "chattle:rooms"]  # no key: nothing more kept
    status, accepted, _ = post_to(first, "shared", "keyed", key="abc{1}:*")
    assert status == 201 and accepted["id"] == 2
    assert post_to(second, "shared", "keyed", key="abc{1}:*")[:2] == (201, accepted)
    assert post_to(second, "elsewhere", "keyed", key="abc{1}:*")[1]["id"] == 1  # another room: posted
    assert contents(second, "shared") == contents(first, "shared") == [(1, "unkeyed"), (2, "keyed")]
    assert 0 < data.ttl("chattle:room:shared:idem:abc{1}:*") <= 120


def test_a_post_held_up_in_redis_is_of_unknown_outcome_and_its_retry_posts_it_once(redis_server, start_chattle):
    """Redis stopped (SIGSTOP) while a post is in flight: the post times out after it was
    sent, and is written when Redis goes on. Its answer must say so, and the client's retry
    with the same key must be given that post, not make a second one."""
    server = start_chattle(redis_url=redis_server.url)
    assert post_to(server, "stall", "before")[0] == 201  # the worker's connection to Redis is made
    redis_server.signal(signal.SIGSTOP)
    try:
        status, body, retry_after = post_to(server, "stall", "during the stall", key="stall-1")
    finally:
        redis_server.signal(signal.SIGCONT)
    assert (status, body["outcome"], retry_after) == (503, "unknown", "1"), body
    assert "same Idempotency-Key" in body["error"]
    wait_until(lambda: len(contents(server, "stall")) == 2, GENEROUS, "the post held up in Redis was written")
    status, again, _ = post_to(server, "stall", "during the stall", key="stall-1")
    assert status == 201 and again["id"] == 2
    assert contents(server, "stall") == [(1, "before"), (2, "during the stall")]


def test_a_post_redis_never_received_is_not_written(redis_server):
    """Refused at connect, or no free connection in time: the 503 says nothing was written."""
    chattle.configure(chattle.Settings(redis=redis_server.url))
    try:
        bus = chattle.get_bus()
        wait_until(bus.healthy, 10.0, "the bus connected")
        pool = bus.client.connection_pool
        taken = [pool.get_connection() for _ in range(bus.POOL_SIZE)]  # every connection busy elsewhere
        try:
            pool.timeout = 0.1  # how long a post waits for a free connection
            answer = post("refused", "m", "r-1")
        finally:
            for connection in taken:
                pool.release(connection)
        assert answer.status == 503 and answer.json["outcome"] == "not written", answer.json
        redis_server.stop()
        answer = post("refused", "m", "r-1")
        assert answer.status == 503 and answer.json["outcome"] == "not written", answer.json
        assert "nothing was written" in answer.json["error"]
    finally:
        chattle.configure(chattle.Settings())


# -- the load client's posters ----------------------------------------------------------------------

def test_the_load_posters_record_an_unknown_outcome_apart_from_a_refusal():
    from loadtests.locustfile import refused_post
    from loadtests.longpoll import Reply

    def reply(status, body):
        return Reply(status, json.dumps(body).encode(), None, 0.0, 0.0)

    unknown = refused_post("r1", reply(503, {"error": "e", "outcome": "unknown"}))
    assert unknown == "post to r1 answered 503, outcome unknown"
    assert refused_post("r1", reply(503, {"error": "e", "outcome": "not written"})) == "post to r1 answered 503"
    assert refused_post("r1", Reply(502, b"<html>", None, 0.0, 0.0)) == "post to r1 answered 502"
