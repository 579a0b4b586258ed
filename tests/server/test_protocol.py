"""The wire protocol, route by route and error row by error row, called in process.

Each test names the rule of /work/shared/wire-protocol.md (and docs/protocol.md)
it holds the server to.
"""

import io
import json

import gevent
import pytest

import chattle
from clients import WsgiAnswer, settle

JSON = {"Content-Type": "application/json"}


def post(wsgi, path, payload, headers=JSON):
    body = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    return wsgi("POST", path, body, headers)


def post_ok(wsgi, room="lobby", sender="ann", content="hi"):
    answer = post(wsgi, "/rooms/%s/msgs" % room, {"from": sender, "content": content})
    assert answer.status == 201, answer.body
    return answer.json


def poll(wsgi, path, **query):
    """A poll that must answer at once: a held one would block the test, so cap it."""
    query_string = "&".join("%s=%s" % item for item in query.items())
    with gevent.Timeout(5, AssertionError("the poll %s?%s was held" % (path, query_string))):
        answer = wsgi("GET", path, query=query_string)
    assert answer.status == 200, answer.body
    assert answer.header("Content-Type").startswith("application/json")
    return answer.json


def ids(answer):
    return [message["id"] for message in answer["messages"]]


def assert_error(answer, status, *words):
    """Every error is JSON {"error": "..."} that says what was wrong (a post's 503 also
    says its "outcome")."""
    assert answer.status == status, (answer.status, answer.body)
    assert answer.header("Content-Type").startswith("application/json")
    body = answer.json
    assert set(body) - ({"outcome"} if status == 503 else set()) == {"error"}
    assert isinstance(body["error"], str) and len(body["error"]) > 15
    for word in words:
        assert word in body["error"], (word, body["error"])
    return body["error"]


def call_raw(environ_extra, input_stream):
    """Call the app with a hand-made wsgi.input and CONTENT_LENGTH (the fixture derives both)."""
    environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/msgs", "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
        "wsgi.input": input_stream, "wsgi.errors": io.StringIO(), "wsgi.version": (1, 0),
        "wsgi.multithread": False, "wsgi.multiprocess": False, "wsgi.run_once": False,
        "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": "",
    }
    environ.update(environ_extra)
    captured = {}

    def start_response(status, headers, exc_info=None):
        captured["status"], captured["headers"] = int(status.split()[0]), headers

    body = b"".join(chattle.app(environ, start_response))
    return WsgiAnswer(captured["status"], captured["headers"], body)


class UnreadableInput:
    """A request body that must never be read."""

    def read(self, *args):
        raise AssertionError("the body was read although its Content-Length is over the limit")

    readline = read


# -- routes ---------------------------------------------------------------------------------

def test_chat_pages_are_html(wsgi):
    for path in ("/", "/rooms/x", "/rooms/" + "r" * 64):
        answer = wsgi("GET", path)
        assert answer.status == 200, path
        assert answer.header("Content-Type").startswith("text/html")


def test_static_assets_are_served(wsgi):
    answer = wsgi("GET", "/static/chattle.js")
    assert answer.status == 200 and answer.body


def test_post_answers_201_with_room_id_and_ts(wsgi):
    answer = post(wsgi, "/rooms/abc/msgs", {"from": "ann", "content": "hi"})
    assert answer.status == 201
    assert answer.header("Content-Type") == "application/json; charset=utf-8"
    body = answer.json
    assert set(body) == {"room", "id", "ts", "epoch"} and body["room"] == "abc" and body["id"] == 1
    assert isinstance(body["ts"], float)
    message = poll(wsgi, "/rooms/abc/msgs", since=0)["messages"][0]
    assert message == {"id": 1, "from": "ann", "content": "hi", "ts": body["ts"]}


def test_seed_urls_are_room_lobby(wsgi):
    answer = post(wsgi, "/msgs", {"from": "ann", "content": "seed"})
    assert answer.status == 201 and answer.json["room"] == "lobby"
    via_room = poll(wsgi, "/rooms/lobby/msgs", since=0)
    via_seed = poll(wsgi, "/msgs", since=0)
    assert via_room == via_seed and via_seed["room"] == "lobby" and ids(via_seed) == [1]
    post_ok(wsgi, "lobby")
    assert ids(poll(wsgi, "/msgs", since=1)) == [2]


def test_health_shape(wsgi):
    answer = wsgi("GET", "/health")
    assert answer.status == 200
    before = chattle.time.time()
    answer = wsgi("GET", "/health")
    assert answer.json == {"status": "ok", "bus": "memory", "pid": chattle.os.getpid(), "time": answer.json["time"]}
    # the memory bus stamps ts with this process's clock, so that is the clock /health tells
    assert before <= answer.json["time"] <= chattle.time.time()


def test_health_degraded_is_503(wsgi, monkeypatch):
    monkeypatch.setattr(chattle.get_bus(), "health", lambda: (False, "Redis does not answer"))
    answer = wsgi("GET", "/health")
    assert answer.status == 503 and answer.json["status"] == "degraded"
    assert answer.json["reason"] == "Redis does not answer" and answer.json["time"] is None


def test_stats_shape(wsgi):
    post_ok(wsgi, "a")
    post_ok(wsgi, "b")
    post_ok(wsgi, "b")
    stats = wsgi("GET", "/stats").json
    assert {"pid", "bus", "waiters", "rooms", "messages", "rss_bytes"} <= set(stats)
    assert stats["pid"] == chattle.os.getpid() and stats["bus"] == "memory"
    assert stats["waiters"] == 0 and stats["rooms"] == 2 and stats["messages"] == 3
    assert isinstance(stats["rss_bytes"], int) and stats["rss_bytes"] > 1 << 20


def test_head_requests_do_not_fail(wsgi):
    post_ok(wsgi)
    for path in ("/", "/health", "/stats", "/msgs", "/rooms/x/msgs?since=0&timeout=0"):
        answer = wsgi("HEAD", path)
        assert answer.status == 200, (path, answer.status, answer.body)


# -- content ----------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    "plain", "héllo wörld ünïcode", "emoji 😀👍🏽 and 中文", "<img src=x onerror=alert(1)>",
    "  leading and trailing spaces  ", "line one\nline two\ttabbed", '"quotes" \\ backslash </script>',
    "\u2028\u2029 separators",
])
def test_content_is_returned_exactly_as_posted(wsgi, content):
    post_ok(wsgi, "exact", "ann", content)
    assert poll(wsgi, "/rooms/exact/msgs", since=0)["messages"][0]["content"] == content
    assert poll(wsgi, "/rooms/exact/msgs")["messages"][0]["content"] == content


def test_from_is_trimmed(wsgi):
    post_ok(wsgi, "trim", "  ann  ", "x")
    assert poll(wsgi, "/rooms/trim/msgs", since=0)["messages"][0]["from"] == "ann"


def test_limits_at_their_exact_boundary_pass(wsgi):
    post_ok(wsgi, "edge", "f" * 40, "c" * 2000)
    post_ok(wsgi, "edge", " " + "f" * 40 + " ", "c")  # 40 after trimming
    message = poll(wsgi, "/rooms/edge/msgs", since=0, limit=1000, timeout=60)["messages"][0]
    assert message["from"] == "f" * 40 and len(message["content"]) == 2000
    assert ids(poll(wsgi, "/rooms/edge/msgs", since=0, timeout=0)) == [1, 2]
    assert ids(poll(wsgi, "/rooms/edge/msgs", since=0, limit=1)) == [1]


def test_body_of_exactly_16_kib_is_accepted(wsgi):
    body = json.dumps({"from": "ann", "content": "x"}).encode()
    body += b" " * (chattle.MAX_BODY_BYTES - len(body))
    assert len(body) == 16384
    assert post(wsgi, "/msgs", body).status == 201


# -- 400: the body ------------------------------------------------------------------------------

@pytest.mark.parametrize("body, words", [
    (b"not json", ["JSON"]),
    (b"", ["JSON"]),
    (b'{"from": "ann", "content": ', ["JSON"]),
    (b'["ann", "hi"]', ["object"]),
    (b'"a string"', ["object"]),
    (b"null", ["object"]),
    (b'{"from": "ann", "content": "\xff\xfe"}', []),
])
def test_body_that_is_not_a_json_object_is_400(wsgi, body, words):
    assert_error(post(wsgi, "/msgs", body), 400, *words)


@pytest.mark.parametrize("payload", [
    {"content": "hi"},
    {"from": 7, "content": "hi"}, {"from": None, "content": "hi"}, {"from": True, "content": "hi"},
    {"from": ["ann"], "content": "hi"}, {"from": {"n": 1}, "content": "hi"},
    {"from": "", "content": "hi"}, {"from": "   ", "content": "hi"}, {"from": " \t\n ", "content": "hi"},
    {"from": "f" * 41, "content": "hi"},
    {"from": "an\x00n", "content": "hi"}, {"from": "an\x1bn", "content": "hi"},
    {"from": "an\nn", "content": "hi"}, {"from": "an\tn", "content": "hi"},
    {"from": "an\x7fn", "content": "hi"}, {"from": "an\x85n", "content": "hi"},
])
def test_bad_from_is_400(wsgi, payload):
    assert_error(post(wsgi, "/msgs", payload), 400, "'from'")


@pytest.mark.parametrize("payload", [
    {"from": "ann"},
    {"from": "ann", "content": 7}, {"from": "ann", "content": None}, {"from": "ann", "content": False},
    {"from": "ann", "content": ["hi"]},
    {"from": "ann", "content": ""},
    {"from": "ann", "content": "c" * 2001},
    {"from": "ann", "content": "a\x00b"}, {"from": "ann", "content": "a\x1bb"},
    {"from": "ann", "content": "a\x7fb"}, {"from": "ann", "content": "a\x85b"},
    {"from": "ann", "content": "a\rb"},
])
def test_bad_content_is_400(wsgi, payload):
    assert_error(post(wsgi, "/msgs", payload), 400, "'content'")


@pytest.mark.parametrize("body, field", [
    (rb'{"from": "\ud800", "content": "x"}', "'from'"),
    (rb'{"from": "ann", "content": "half \udc00 a pair"}', "'content'"),
])
def test_lone_surrogate_escapes_are_400_not_500(wsgi, body, field):
    assert_error(post(wsgi, "/msgs", body), 400, field)


def test_escaped_surrogate_pair_is_one_character(wsgi):
    assert post(wsgi, "/msgs", rb'{"from": "ann", "content": "\ud83d\ude00"}').status == 201
    assert poll(wsgi, "/msgs", since=0)["messages"][0]["content"] == "\U0001F600"


def test_rejected_posts_write_nothing(wsgi):
    post(wsgi, "/msgs", {"from": "", "content": "x"})
    post(wsgi, "/msgs", {"from": "ann", "content": "x" * 2001})
    assert poll(wsgi, "/msgs", since=0, timeout=0) == \
        {"room": "lobby", "messages": [], "cursor": 0, "missed": 0, "epoch": None}


# -- 400: the query -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, value", [
    ("since", "-1"), ("since", "abc"), ("since", "1.5"), ("since", ""), ("since", "1e3"),
    ("limit", "0"), ("limit", "1001"), ("limit", "x"), ("limit", "-5"),
    ("timeout", "-1"), ("timeout", "61"), ("timeout", "nan"), ("timeout", "inf"), ("timeout", "x"),
    ("timeout", "-inf"), ("timeout", "60.001"),
    ("since", "1_0"), ("since", "%201"), ("since", "99999999999999999999999"), ("timeout", "1_0"),
    ("timeout", "1e1"), ("limit", "%D9%A1"),  # an Arabic-Indic digit one, which int() would take
])
def test_query_number_out_of_range_is_400(wsgi, name, value):
    query = "%s=%s" % (name, value)
    if name != "since":
        query += "&since=0"
    with gevent.Timeout(5, AssertionError("held although the query was invalid")):
        answer = wsgi("GET", "/msgs", query=query)
    assert_error(answer, 400, name)


# -- 404 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path", [
    ("GET", "/nope"), ("POST", "/nope"), ("GET", "/rooms"), ("GET", "/rooms/a/msgs/extra"),
    ("GET", "/rooms/" + "r" * 65 + "/msgs"), ("POST", "/rooms/" + "r" * 65 + "/msgs"),
    ("GET", "/rooms/" + "r" * 65),
    ("GET", "/rooms/a.b/msgs"), ("POST", "/rooms/a.b/msgs"),
    ("GET", "/rooms/a b/msgs"),  # what the server hands the app for /rooms/a%20b/msgs
    ("GET", "/rooms//msgs"), ("POST", "/rooms//msgs"),
    ("GET", "/rooms/a%2Fb/msgs"), ("GET", "/rooms/ä/msgs"),
])
def test_unknown_route_or_bad_room_is_404(wsgi, method, path):
    answer = wsgi(method, path, b'{"from": "ann", "content": "x"}' if method == "POST" else b"",
                  JSON if method == "POST" else None)
    assert_error(answer, 404)


# -- 405 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, allowed", [
    ("PUT", "/msgs", "POST"), ("DELETE", "/msgs", "POST"),
    ("PUT", "/rooms/a/msgs", "POST"), ("DELETE", "/rooms/a/msgs", "GET"),
    ("PATCH", "/rooms/a/msgs", "GET"),
    ("POST", "/health", "GET"), ("POST", "/stats", "GET"), ("DELETE", "/", "GET"),
])
def test_wrong_method_is_405_with_allow(wsgi, method, path, allowed):
    answer = wsgi(method, path, b"{}", JSON)
    message = assert_error(answer, 405, method)
    allow = answer.header("Allow")
    assert allow and allowed in allow
    assert method not in allow.split(",")
    assert allowed in message


# -- 413 -------------------------------------------------------------------------------------------

def test_declared_body_over_16_kib_is_refused_unread(app_state):
    answer = call_raw({"CONTENT_LENGTH": str(16 * 1024 + 1)}, UnreadableInput())
    assert_error(answer, 413, "16384")
    assert answer.header("Connection") == "close"
    answer = call_raw({"CONTENT_LENGTH": "10000000000"}, UnreadableInput())
    assert_error(answer, 413)


def test_undeclared_body_over_16_kib_is_413(app_state):
    payload = json.dumps({"from": "ann", "content": "x" * 1000}).encode() + b" " * 20000
    answer = call_raw({}, io.BytesIO(payload))
    assert_error(answer, 413)
    body = json.dumps({"from": "ann", "content": "fits"}).encode()
    assert call_raw({}, io.BytesIO(body + b" " * (16384 - len(body)))).status == 201


def test_body_shorter_than_declared_is_400(app_state):
    assert_error(call_raw({"CONTENT_LENGTH": "100"}, io.BytesIO(b'{"from": "a"}')), 400)
    assert_error(call_raw({"CONTENT_LENGTH": "12x"}, io.BytesIO(b"{}")), 400, "Content-Length")


# -- 415 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Content-Type": "text/plain"},
                                     {"Content-Type": "application/x-www-form-urlencoded"},
                                     {"Content-Type": "application/jsonx"}])
def test_post_without_json_content_type_is_415(wsgi, headers):
    answer = post(wsgi, "/msgs", {"from": "ann", "content": "x"}, headers)
    assert_error(answer, 415, "application/json")


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON",
                                          "application/json;charset=UTF-8"])
def test_json_content_type_with_parameters_is_accepted(wsgi, content_type):
    assert post(wsgi, "/msgs", {"from": "ann", "content": "x"}, {"Content-Type": content_type}).status == 201


# -- 503 -------------------------------------------------------------------------------------------

def test_unreachable_bus_on_post_is_503_and_writes_nothing(wsgi, monkeypatch):
    post_ok(wsgi)

    def unreachable(*args, **kwargs):
        raise chattle.BusUnavailable("ConnectionError")

    monkeypatch.setattr(chattle.get_bus(), "publish", unreachable)
    answer = post(wsgi, "/msgs", {"from": "ann", "content": "lost"})
    assert_error(answer, 503, "nothing was written")
    assert answer.json["outcome"] == "not written"
    assert answer.header("Retry-After") == "1"
    monkeypatch.undo()
    assert poll(wsgi, "/msgs", since=1, timeout=0)["messages"] == []
    assert ids(poll(wsgi, "/msgs", since=0)) == [1]
    assert post_ok(wsgi)["id"] == 2


def test_a_post_of_unknown_outcome_is_a_503_of_its_own(wsgi, monkeypatch):
    def unanswered(*args, **kwargs):
        raise chattle.BusUnavailable("TimeoutError", maybe_written=True)

    monkeypatch.setattr(chattle.get_bus(), "publish", unanswered)
    answer = post(wsgi, "/msgs", {"from": "ann", "content": "sent, never answered"})
    assert_error(answer, 503, "outcome is unknown", "same Idempotency-Key")
    assert answer.json["outcome"] == "unknown"
    assert answer.header("Retry-After") == "1"


def test_unreachable_bus_on_poll_is_503(wsgi, monkeypatch):
    def unreachable(*args, **kwargs):
        raise chattle.BusUnavailable("ConnectionError")

    monkeypatch.setattr(chattle.get_bus(), "room", unreachable)
    answer = wsgi("GET", "/msgs", query="since=0")
    assert_error(answer, 503)
    assert answer.header("Retry-After") == "1"


# -- since, limit, cursor, missed, reset ---------------------------------------------------------

def test_ids_are_dense_per_room_and_rooms_are_independent(wsgi):
    assert [post_ok(wsgi, room)["id"] for room in ("a", "b", "a", "a", "b", "c")] == [1, 1, 2, 3, 2, 1]
    assert ids(poll(wsgi, "/rooms/a/msgs", since=0)) == [1, 2, 3]
    assert ids(poll(wsgi, "/rooms/b/msgs", since=0)) == [1, 2]
    assert ids(poll(wsgi, "/rooms/c/msgs", since=0)) == [1]


def test_empty_room(wsgi):
    # no history yet, so no epoch: the first post names it
    assert poll(wsgi, "/rooms/new/msgs") == {"room": "new", "messages": [], "cursor": 0, "missed": 0, "epoch": None}
    assert poll(wsgi, "/rooms/new/msgs", since=0, timeout=0) == \
        {"room": "new", "messages": [], "cursor": 0, "missed": 0, "epoch": None}


def test_no_since_is_newest_at_most_limit_default_50(app_state, wsgi):
    chattle.configure(chattle.Settings(history=200))
    for _ in range(120):
        post_ok(wsgi, "r")
    answer = poll(wsgi, "/rooms/r/msgs")
    assert ids(answer) == list(range(71, 121)) and answer["cursor"] == 120 and answer["missed"] == 0
    assert ids(poll(wsgi, "/rooms/r/msgs", limit=3)) == [118, 119, 120]
    assert ids(poll(wsgi, "/rooms/r/msgs", limit=1000)) == list(range(1, 121))


def test_since_is_oldest_first_at_most_limit_default_100(app_state, wsgi):
    chattle.configure(chattle.Settings(history=200))
    for _ in range(120):
        post_ok(wsgi, "r")
    answer = poll(wsgi, "/rooms/r/msgs", since=0)
    assert ids(answer) == list(range(1, 101)) and answer["cursor"] == 100 and answer["missed"] == 0
    answer = poll(wsgi, "/rooms/r/msgs", since=answer["cursor"])
    assert ids(answer) == list(range(101, 121)) and answer["cursor"] == 120
    answer = poll(wsgi, "/rooms/r/msgs", since=10, limit=5)
    assert ids(answer) == [11, 12, 13, 14, 15] and answer["cursor"] == 15


def test_cursor_walk_sees_every_id_once(wsgi):
    for _ in range(23):
        post_ok(wsgi, "walk")
    cursor, seen = 0, []
    for _page in range(10):  # 23 ids in pages of 4; a cursor that never moves ends here too, and fails below
        answer = poll(wsgi, "/rooms/walk/msgs", since=cursor, limit=4, timeout=0)
        if not answer["messages"]:
            assert answer["cursor"] == cursor
            break
        seen += ids(answer)
        assert answer["cursor"] == seen[-1]
        cursor = answer["cursor"]
    assert seen == list(range(1, 24))


def test_missed_counts_what_history_dropped(wsgi):
    for _ in range(60):  # the fixture retains 50: ids 11..60
        post_ok(wsgi, "m")
    answer = poll(wsgi, "/rooms/m/msgs", since=0)
    assert answer["missed"] == 10 and ids(answer) == list(range(11, 61)) and answer["cursor"] == 60
    answer = poll(wsgi, "/rooms/m/msgs", since=4, limit=5)
    assert answer["missed"] == 6 and ids(answer) == [11, 12, 13, 14, 15] and answer["cursor"] == 15
    answer = poll(wsgi, "/rooms/m/msgs", since=10)
    assert answer["missed"] == 0 and ids(answer) == list(range(11, 61))
    answer = poll(wsgi, "/rooms/m/msgs", since=30, limit=2)
    assert answer["missed"] == 0 and ids(answer) == [31, 32]
    answer = poll(wsgi, "/rooms/m/msgs")
    assert answer["missed"] == 0 and ids(answer) == list(range(11, 61))


def test_cursor_from_the_future_resets_at_once(wsgi):
    for _ in range(5):
        post_ok(wsgi, "f")
    answer = poll(wsgi, "/rooms/f/msgs", since=99, timeout=60)
    assert answer["reset"] is True and ids(answer) == [1, 2, 3, 4, 5] and answer["cursor"] == 5
    answer = poll(wsgi, "/rooms/f/msgs", since=6, limit=2)
    assert answer["reset"] is True and ids(answer) == [4, 5] and answer["cursor"] == 5
    answer = poll(wsgi, "/rooms/never/msgs", since=3)
    assert answer == {"room": "never", "messages": [], "cursor": 0, "missed": 0, "epoch": None, "reset": True}
    assert "reset" not in poll(wsgi, "/rooms/f/msgs", since=5, timeout=0)


def test_timeout_answers_empty_with_cursor_n(wsgi):
    epoch = post_ok(wsgi, "t")["epoch"]
    assert poll(wsgi, "/rooms/t/msgs", since=1, timeout="0.05") == \
        {"room": "t", "messages": [], "cursor": 1, "missed": 0, "epoch": epoch}
    assert poll(wsgi, "/rooms/t/msgs", since=1, timeout=0)["cursor"] == 1


def test_held_poll_is_woken_by_a_post(wsgi):
    post_ok(wsgi, "w")
    held = [gevent.spawn(wsgi, "GET", "/rooms/w/msgs", query="since=1&timeout=30") for _ in range(5)]
    other_room = gevent.spawn(wsgi, "GET", "/rooms/x/msgs", query="since=0&timeout=30")
    settle(lambda: chattle.rooms.waiters == 6, "six polls parked")
    assert chattle.rooms.waiters == 6 and not any(greenlet.ready() for greenlet in held)
    posted = post_ok(wsgi, "w", "bob", "wake up")
    gevent.joinall(held, timeout=5, raise_error=True)
    for greenlet in held:
        answer = greenlet.value.json
        assert ids(answer) == [2] and answer["cursor"] == 2 and answer["messages"][0]["ts"] == posted["ts"]
    assert not other_room.ready() and chattle.rooms.waiters == 1
    other_room.kill()
    assert chattle.rooms.waiters == 0


def test_a_fan_out_encodes_one_answer(wsgi):
    post_ok(wsgi, "fan")
    held = [gevent.spawn(wsgi, "GET", "/rooms/fan/msgs", query="since=1&timeout=30") for _ in range(50)]
    settle(lambda: chattle.rooms.waiters == 50, "fifty polls parked")
    before = chattle.rooms.encodes
    post_ok(wsgi, "fan")
    gevent.joinall(held, timeout=5, raise_error=True)
    assert chattle.rooms.encodes - before == 1
    assert len({greenlet.value.body for greenlet in held}) == 1


def test_closing_answers_held_polls_at_once(wsgi):
    post_ok(wsgi, "c")
    held = [gevent.spawn(wsgi, "GET", "/rooms/c/msgs", query="since=1&timeout=60") for _ in range(3)]
    settle(lambda: chattle.rooms.waiters == 3, "three polls parked")
    chattle.rooms.close()
    gevent.joinall(held, timeout=5, raise_error=True)
    for greenlet in held:
        assert greenlet.value.status == 200 and greenlet.value.json["messages"] == []
        assert greenlet.value.json["cursor"] == 1
        assert greenlet.value.header("Connection") == "close"


def test_polling_made_up_rooms_does_not_grow_the_worker(wsgi):
    for number in range(200):
        assert wsgi("GET", "/rooms/nobody-%d/msgs?since=0&timeout=0" % number).status == 200
    assert wsgi("GET", "/stats").json["rooms"] == 0
    wsgi("POST", "/rooms/kept/msgs", '{"from": "ann", "content": "hi"}', {"Content-Type": "application/json"})
    wsgi("GET", "/rooms/kept/msgs?since=0&timeout=0")
    assert wsgi("GET", "/stats").json["rooms"] == 1
