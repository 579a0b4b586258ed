"""The server under hostile clients, over real sockets on 127.0.0.1: idle and slow
connections, oversized and malformed heads, ambiguous body framing, clients that never
read, crafted bodies and paths, and the memory a few cheap requests could pin.

Every test runs against `python chattle.py` and against gunicorn with gunicorn.conf.py
(ChattleWorker), each started once per module with short deadlines so the suite stays
fast. Each test waits on a condition under a deadline, never on how fast it happened.
"""

import json
import time

import gevent
import pytest

from clients import Raw, request
from harness.processes import ChattleServer, get_json, wait_until

DEADLINE = 1.0  # seconds: the head, keep-alive and send deadlines of the servers below
# A deadline is enforced within a tick (0.25 s) after it passes; the rest is this
# machine's load. On a server without the deadline the connection stays open throughout.
CLOSED_WITHIN = DEADLINE + 4.0
# Answers of up to 8 MB, as before the answer bound: larger than the kernel's send buffers
# take on loopback (about 3 MB), so a client that reads nothing holds the server's send.
SHORT_DEADLINES = {"CHATTLE_HEAD_TIMEOUT": str(DEADLINE), "CHATTLE_KEEPALIVE_TIMEOUT": str(DEADLINE),
                   "CHATTLE_SEND_TIMEOUT": str(DEADLINE), "CHATTLE_HISTORY": "1000",
                   "CHATTLE_MAX_ANSWER_BYTES": str(16 * 1024 * 1024)}
BIG_ROOM = "big"
BIG_MESSAGES = 1000
WIDE = "\U0001F600" * 2000  # 2,000 characters, 8,000 bytes of UTF-8: the largest message


@pytest.fixture(scope="module", params=["python", "gunicorn"])
def server(request, tmp_path_factory):
    """A server of each kind, with short deadlines and a room of 1,000 of the largest
    messages (an 8 MB answer at limit=1000)."""
    log_path = str(tmp_path_factory.mktemp("hostile") / ("%s.log" % request.param))
    started = ChattleServer(gunicorn=request.param == "gunicorn", env=SHORT_DEADLINES, log_path=log_path)
    try:
        fill_room(started.port, BIG_ROOM, BIG_MESSAGES, WIDE)
        yield started
    finally:
        started.stop()


# -- a raw client -----------------------------------------------------------------------------

def post_request(room, content, sender="ann"):
    body = json.dumps({"from": sender, "content": content}, ensure_ascii=False).encode()
    return request("POST", "/rooms/%s/msgs" % room,
                   ["Content-Type: application/json", "Content-Length: %d" % len(body)], body)


def fill_room(port, room, count, content):
    client = Raw(port)
    try:
        for _ in range(count):
            client.sock.sendall(post_request(room, content))
            status, _headers, _body = client.answer()
            assert status == 201
    finally:
        client.close()


def refused(port, data, within=10.0):
    """Send `data` on a fresh connection: (status, headers, body) of the answer, and
    whether the server then closed the connection."""
    client = Raw(port)
    try:
        client.sock.sendall(data)
        status, headers, body = client.answer(within)
        return status, headers, body, client.closed_by_server(CLOSED_WITHIN)
    finally:
        client.close()


def stats(server):
    return get_json(server.url + "/stats")[1]


# -- 1. deadlines ---------------------------------------------------------------------------

def test_a_connection_that_sends_nothing_is_closed(server):
    client = Raw(server.port)
    try:
        assert client.closed_by_server(CLOSED_WITHIN), "still open %gs after connecting" % CLOSED_WITHIN
    finally:
        client.close()


def test_half_a_request_head_is_answered_408_and_closed(server):
    client = Raw(server.port)
    try:
        client.sock.sendall(b"GET /rooms/a/msgs HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        status, headers, body = client.answer(CLOSED_WITHIN)
        assert status == 408 and "error" in body and headers["connection"] == "close"
        assert client.closed_by_server(CLOSED_WITHIN)
    finally:
        client.close()


def test_a_head_sent_one_byte_at_a_time_is_cut_off(server):
    """A byte every 0.1 s keeps the connection busy but never completes the head in time:
    the head deadline counts from its first byte, not from the last one."""
    client = Raw(server.port)
    data = request("GET", "/rooms/a/msgs?" + "x" * 200)
    started = time.monotonic()
    try:
        for byte in data[:-4]:
            if time.monotonic() - started > CLOSED_WITHIN:
                break
            try:
                client.sock.sendall(bytes([byte]))
            except OSError:
                break
            gevent.sleep(0.1)
        assert client.closed_by_server(1.0), "the drip was still served after %.1fs" % (time.monotonic() - started)
        assert time.monotonic() - started < CLOSED_WITHIN
    finally:
        client.close()


def test_a_held_poll_outlasts_the_deadlines_then_the_idle_connection_is_closed(server):
    """A poll held for 3 deadlines is legal; once answered, the keep-alive connection
    idle for longer than its deadline is closed."""
    since = get_json(server.url + "/rooms/held/msgs")[1]["cursor"]
    client = Raw(server.port)
    try:
        started = time.monotonic()
        client.sock.sendall(request("GET", "/rooms/held/msgs?since=%d&timeout=%g" % (since, 3 * DEADLINE)))
        status, headers, body = client.answer(within=3 * DEADLINE + 10)
        assert status == 200 and body["messages"] == [] and time.monotonic() - started >= 3 * DEADLINE
        assert headers.get("connection") != "close"
        assert client.closed_by_server(CLOSED_WITHIN), "an idle keep-alive connection stayed open"
    finally:
        client.close()


def test_an_answer_the_client_never_takes_drops_the_connection(server):
    """An 8 MB answer to a client that reads nothing fills both socket buffers; after the
    send deadline the server drops the connection and the rest of the answer with it."""
    client = Raw(server.port, receive_buffer=4096)
    try:
        client.sock.sendall(request("GET", "/rooms/%s/msgs?since=0&limit=1000" % BIG_ROOM))
        gevent.sleep(DEADLINE + 2.0)  # the server is stuck on its send all this while
        received, reset = 0, False
        client.sock.settimeout(10)
        try:
            while True:
                chunk = client.sock.recv(1 << 20)
                if not chunk:
                    break
                received += len(chunk)
        except ConnectionResetError:
            reset = True
        assert reset or received < BIG_MESSAGES * len(WIDE.encode()), \
            "the whole answer (%d bytes) was still there to take" % received
    finally:
        client.close()


def test_a_body_promised_and_never_sent_does_not_hold_the_connection(server):
    """A poll that declares a body it never sends: after the answer, what is left of the
    body must arrive within the head deadline, as the next head would."""
    client = Raw(server.port)
    try:
        client.sock.sendall(request("GET", "/rooms/a/msgs?timeout=0", ["Content-Length: 100000"]))
        status, _headers, _body = client.answer()
        assert status == 200
        assert client.closed_by_server(CLOSED_WITHIN), "the connection waits for the body for good"
    finally:
        client.close()


# -- 2. head caps -----------------------------------------------------------------------------

def test_a_head_over_32_kib_is_431_json(server):
    headers = ["X-Filler-%d: %s" % (number, "a" * 1000) for number in range(40)]
    status, answer_headers, body, closed = refused(server.port, request("GET", "/health", headers))
    assert status == 431 and "error" in body and answer_headers["connection"] == "close" and closed


def test_a_head_of_320_kb_is_answered_431(server):
    headers = ["X-Filler-%d: %s" % (number, "a" * 3200) for number in range(98)]
    status, _headers, body, closed = refused(server.port, request("GET", "/health", headers))
    assert status == 431 and "error" in body and closed


def test_more_than_100_headers_is_431_json(server):
    headers = ["X-H%d: v" % number for number in range(101)]
    status, answer_headers, body, closed = refused(server.port, request("GET", "/health", headers))
    assert status == 431 and "error" in body and answer_headers["connection"] == "close" and closed


def test_a_request_line_over_the_limit_is_414_json(server):
    status, answer_headers, body, closed = refused(server.port, request("GET", "/rooms/a/msgs?x=" + "a" * 40000))
    assert status == 414 and "error" in body and answer_headers["connection"] == "close" and closed


def test_a_request_line_over_8_kib_is_414_json(server):
    """As nginx refuses by default: a line of 20 KB is not a request anyone means."""
    status, answer_headers, body, closed = refused(server.port, request("GET", "/" + "a" * 20000))
    assert status == 414 and "8192" in body["error"] and answer_headers["connection"] == "close" and closed


def test_a_long_request_line_within_the_limit_is_served(server):
    status, _headers, body, _closed = refused(server.port, request("GET", "/" + "a" * 8000))
    assert status == 404 and "error" in body


# -- 3. the answer cache ----------------------------------------------------------------------

def test_catch_up_reads_of_a_quiet_room_pin_nothing_beyond_the_bound(server):
    """64 reads at distinct cursors of 1,000 large messages: each body is up to 8 MB, and
    keeping them all would pin about 256 MB until the room's next post."""
    before = stats(server)["rss_bytes"]
    client = Raw(server.port)
    try:
        for since in range(0, 640, 10):
            client.sock.sendall(request("GET", "/rooms/%s/msgs?since=%d&limit=1000&timeout=0" % (BIG_ROOM, since)))
            status, _headers, body = client.answer(30)
            assert status == 200 and body["cursor"] == BIG_MESSAGES
    finally:
        client.close()
    after = stats(server)
    assert after["answer_cache_bytes"] <= 1024 * 1024
    assert after["rss_bytes"] - before < 64 * 1024 * 1024, "RSS rose by %d MB" % ((after["rss_bytes"] - before) >> 20)


# -- 4. retained history: bounded per worker, and expiring in Redis ---------------------------

@pytest.mark.parametrize("bus", ["memory", "redis"])
def test_the_least_recently_active_rooms_are_forgotten_at_the_bound(start_chattle, request, bus):
    """3.2 MB of messages over 21 rooms, against a bound of 1 MiB: the room posted to first
    is forgotten. With the in-memory bus its client is told "reset"; with the shared bus
    the worker loads it again from Redis, where its ids go on."""
    bound = 1024 * 1024
    redis_url = request.getfixturevalue("redis_server").url if bus == "redis" else None
    chattle = start_chattle(redis_url=redis_url, env={"CHATTLE_MAX_RETAINED_BYTES": str(bound)})
    for name in ["oldest"] + ["room%d" % number for number in range(20)]:
        fill_room(chattle.port, name, 10, WIDE)
        # a worker on the shared bus holds a room once a poll names it
        assert get_json(chattle.url + "/rooms/%s/msgs?limit=1" % name)[1]["cursor"] == 10
    figures = stats(chattle)
    assert figures["retained_bytes"] <= bound and figures["messages"] < 210
    status, body = get_json(chattle.url + "/rooms/oldest/msgs?since=5&timeout=0")
    if bus == "memory":
        assert status == 200 and body.get("reset") is True and body["messages"] == []
    else:
        assert status == 200 and [message["id"] for message in body["messages"]] == [6, 7, 8, 9, 10]
    status, body = get_json(chattle.url + "/rooms/room19/msgs?since=5&timeout=0")
    assert status == 200 and [message["id"] for message in body["messages"]] == [6, 7, 8, 9, 10]


def test_idle_rooms_expire_in_redis_and_start_a_new_life(start_chattle, redis_server):
    import redis

    ttl = 2
    chattle = start_chattle(redis_url=redis_server.url, env={"CHATTLE_ROOM_TTL": str(ttl)})
    fill_room(chattle.port, "brief", 3, "hello")
    assert get_json(chattle.url + "/rooms/brief/msgs")[1]["cursor"] == 3  # the worker holds a copy
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert 0 < client.ttl("chattle:room:brief:last") <= ttl
        assert 0 < client.ttl("chattle:room:brief:stream") <= ttl
        wait_until(lambda: not client.exists("chattle:room:brief:last"), ttl + 10, "the room's keys expire")
    finally:
        client.close()
    fill_room(chattle.port, "brief", 1, "again")  # the first id of the room's next life is 1 again

    def reset_to_the_new_life():
        status, body = get_json(chattle.url + "/rooms/brief/msgs?since=3&timeout=0")
        return status == 200 and body.get("reset") is True and body["cursor"] == 1

    # the worker's reader finds Redis behind its copy, drops it and loads the new life
    wait_until(reset_to_the_new_life, 10, "a client at the old cursor is told reset")


# -- 6. deep JSON -----------------------------------------------------------------------------

def test_deeply_nested_json_is_400_without_a_traceback(server):
    body = b"[" * 5000
    status, _headers, answer, _closed = refused(server.port, request(
        "POST", "/rooms/deep/msgs", ["Content-Type: application/json", "Content-Length: %d" % len(body)], body))
    assert status == 400 and "error" in answer
    log = open(server.log_path, "rb").read()
    assert b"Traceback" not in log and b"RecursionError" not in log


# -- 7. malformed heads: JSON with the right status -------------------------------------------

@pytest.mark.parametrize("head, expected", [
    (b"POST /msgs HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: ten\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nthis is not a header\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nX-Folded: a\r\n b\r\n\r\n", 400),
    (b"NOT A REQUEST LINE AT ALL\r\n\r\n", 400),
    (b"GET /health HTTP/2.0\r\n\r\n", 505),
])
def test_a_malformed_head_gets_a_json_error_and_a_close(server, head, expected):
    status, headers, body, closed = refused(server.port, head)
    assert status == expected and isinstance(body, dict) and "error" in body
    assert headers["connection"] == "close" and closed


# -- 8. ambiguous framing ---------------------------------------------------------------------

SMUGGLED = b"GET /rooms/smuggled/msgs HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
EMPTY_CHUNKED = b"0\r\n\r\n"  # a complete chunked body, with nothing in it


@pytest.mark.parametrize("framing, body", [
    (["Transfer-Encoding: gzip, chunked", "Content-Length: %d" % len(EMPTY_CHUNKED + SMUGGLED)],
     EMPTY_CHUNKED + SMUGGLED),
    (["Transfer-Encoding: chunked", "Content-Length: %d" % len(EMPTY_CHUNKED + SMUGGLED)],
     EMPTY_CHUNKED + SMUGGLED),
    (["Content-Length: %d" % len(SMUGGLED), "Content-Length: 0"], SMUGGLED),
    (["Transfer-Encoding: gzip"], SMUGGLED),
], ids=["te-list-and-cl", "te-and-cl", "two-cls", "te-not-chunked"])
def test_ambiguous_framing_is_refused_and_the_connection_closed(server, framing, body):
    """What follows the head holds a request of its own: a server that reads the framing
    differently from a proxy in front would answer it as the next request (request
    smuggling)."""
    head = request("POST", "/rooms/a/msgs", ["Content-Type: application/json", *framing], body)
    client = Raw(server.port)
    try:
        client.sock.sendall(head)
        status, headers, answer = client.answer()
        assert status == 400 and "error" in answer and headers["connection"] == "close"
        assert client.closed_by_server(CLOSED_WITHIN)
        assert b"HTTP/1.1" not in client.buffer, "the body was answered as a request"
    finally:
        client.close()


# -- 9. room names ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_room_name_that_is_not_utf8_is_404(server, method):
    body = json.dumps({"from": "ann", "content": "hi"}).encode()
    headers = ["Content-Type: application/json", "Content-Length: %d" % len(body)] if method == "POST" else []
    status, _headers, answer, _closed = refused(
        server.port, request(method, "/rooms/lob%FFby/msgs", headers, body if method == "POST" else b""))
    assert status == 404 and "error" in answer


# -- every limit is a setting: a flag, a variable, and gunicorn's own knob where it has one ---

def test_the_limits_are_flags_of_python_chattle_py(start_chattle):
    chattle = start_chattle(extra_args=["--max-headers", "5", "--max-head-bytes", "2048",
                                        "--max-line-bytes", "1000"])
    too_many = ["X-H%d: v" % n for n in range(5)]
    status, _headers, body, _closed = refused(chattle.port, request("GET", "/health", too_many))
    assert status == 431 and "over the limit of 5" in body["error"]
    status, _headers, body, _closed = refused(chattle.port, request("GET", "/health", ["X-Long: " + "a" * 3000]))
    assert status == 431 and "2048" in body["error"]
    status, _headers, body, _closed = refused(chattle.port, request("GET", "/" + "a" * 1500))
    assert status == 414 and "1000" in body["error"]


def test_gunicorn_conf_hands_the_limits_to_gunicorns_own_worker():
    """The seed's `--worker-class gevent` parses heads with gunicorn's parser: gunicorn.conf.py
    gives it the same keep-alive deadline and header caps, from the same variables."""
    from clients import effective_config

    config = effective_config({"CHATTLE_KEEPALIVE_TIMEOUT": "3", "CHATTLE_MAX_HEADERS": "50",
                               "CHATTLE_MAX_HEAD_BYTES": "4000"})
    assert (config["keepalive"], config["limit_request_fields"]) == ("3", "50")
    assert (config["limit_request_line"], config["limit_request_field_size"]) == ("4000", "4000")


def test_no_hostile_client_left_a_traceback(server):
    """Runs after every test above on the same server: a client's mistake leaves no
    traceback in the server's log."""
    log = open(server.log_path, "rb").read()
    assert b"Traceback" not in log, log.decode("utf-8", "replace")[-3000:]
