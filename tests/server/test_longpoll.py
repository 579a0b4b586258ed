"""Long-polls against a real server process over real sockets on 127.0.0.1.

The test process is gevent-patched, so each held poll is a greenlet with its own
socket; hundreds of them cost the test little. Waits are on conditions with generous
deadlines, never on how fast something happened.
"""

import json
import time

import gevent
import psutil
import pytest

from clients import GENEROUS, HttpConnection, held_poll, post, stats, wait_for_waiters
from harness.processes import get_json, wait_until
from instruments.measures import DeliveryLedger, delivery_summary

IDLE_WAKEUPS = 5  # a stray timer or two of gevent's; measured 0 and 1 here


def settled_descriptor_count(process):
    """The process's open descriptors once connections just answered are closed too:
    the server closes a connection after the hub's current round, a moment after the
    client has read its answer."""
    deadline = time.monotonic() + GENEROUS
    readings = [process.num_fds()]
    while time.monotonic() < deadline and not (len(readings) >= 3 and len(set(readings[-3:])) == 1):
        gevent.sleep(0.05)
        readings.append(process.num_fds())
    return readings[-1]


def test_one_post_wakes_300_held_polls(start_chattle):
    server = start_chattle()
    polls = [gevent.spawn(held_poll, server.port, "/rooms/crowd/msgs?since=0&timeout=50") for _ in range(300)]
    wait_for_waiters(server, 300)
    assert not any(greenlet.ready() for greenlet in polls)
    posted = post(server, "crowd", "to everyone")
    gevent.joinall(polls, timeout=GENEROUS, raise_error=True)
    assert all(greenlet.ready() for greenlet in polls)
    for greenlet in polls:
        status, _headers, body = greenlet.value
        assert status == 200
        assert body["messages"] == [{"id": 1, "from": "ann", "content": "to everyone", "ts": posted["ts"]}]
        assert body["cursor"] == 1 and body["missed"] == 0
    assert stats(server)["waiters"] == 0



def test_a_wait_for_held_polls_that_runs_out_says_how_many_were_held(start_chattle):
    server = start_chattle()
    with pytest.raises(AssertionError, match=r"(?s)1 held polls: not ready after 0.5s.*the server held \[0\]"):
        wait_for_waiters(server, 1, within=0.5)

def test_timeout_is_honoured(start_chattle):
    server = start_chattle()
    epoch = post(server, "quiet")["epoch"]
    started = time.monotonic()
    status, _headers, body = held_poll(server.port, "/rooms/quiet/msgs?since=1&timeout=2")
    elapsed = time.monotonic() - started
    assert status == 200 and body == {"room": "quiet", "messages": [], "cursor": 1, "missed": 0, "epoch": epoch}
    assert 1.5 <= elapsed < GENEROUS, elapsed


def test_cursor_from_the_future_is_answered_at_once(start_chattle):
    server = start_chattle()
    post(server, "past")
    post(server, "past")
    poll = gevent.spawn(held_poll, server.port, "/rooms/past/msgs?since=40&timeout=60")
    poll.join(timeout=GENEROUS)  # far under the 60 s it asked for
    assert poll.ready(), "a cursor from the future was held"
    status, _headers, body = poll.get()
    assert status == 200 and body["reset"] is True and body["cursor"] == 2
    assert [message["id"] for message in body["messages"]] == [1, 2]


def test_a_vanished_client_is_released_by_its_timeout(start_chattle):
    server = start_chattle()
    process = psutil.Process(server.pid)
    post(server, "gone")
    stats(server)
    baseline = settled_descriptor_count(process)
    connection = HttpConnection(server.port)
    connection.send("GET", "/rooms/gone/msgs?since=1&timeout=2")
    wait_for_waiters(server, 1)
    assert process.num_fds() > baseline
    connection.close()
    wait_for_waiters(server, 0)
    wait_until(lambda: process.num_fds() <= baseline, GENEROUS,
             "descriptors back to %d (now %d)" % (baseline, process.num_fds()))


def test_200_up_to_date_polls_leave_the_server_idle(start_chattle):
    """The seed waited on one Event and cleared it after waking: polls that re-arrived
    before the clear found it set and spun. Held polls must consume no CPU."""
    server = start_chattle()
    process = psutil.Process(server.pid)
    connections = [HttpConnection(server.port) for _ in range(200)]
    for connection in connections:
        connection.send("GET", "/rooms/idle/msgs?since=0&timeout=30")
    wait_for_waiters(server, 200)
    post(server, "idle")

    def repoll(connection):  # straight back with the new cursor, right after the broadcast
        status, _headers, body = connection.receive()
        assert status == 200 and body["cursor"] == 1
        connection.send("GET", "/rooms/idle/msgs?since=1&timeout=30")

    gevent.joinall([gevent.spawn(repoll, connection) for connection in connections],
                   timeout=GENEROUS, raise_error=True)
    wait_for_waiters(server, 200)
    # Idle means the server never wakes: its main thread blocks in the hub's epoll_wait
    # and counts one voluntary switch per wake-up, whatever else loads the machine. A
    # spinning poll or a timer per poll would wake it hundreds of times in the window;
    # CPU seconds would measure the machine's load as much as the server.
    before = process.num_ctx_switches().voluntary
    gevent.sleep(2.0)  # the window observed, not a wait for anything
    woke = process.num_ctx_switches().voluntary - before
    assert stats(server)["waiters"] == 200
    assert woke <= IDLE_WAKEUPS, "the server woke %d times in 2 s holding 200 up-to-date polls" % woke
    for connection in connections:
        connection.close()


def test_a_burst_reaches_every_listener_once_in_order(start_chattle):
    server = start_chattle()
    listeners, posts = 100, 200
    ledgers = [DeliveryLedger(0) for _ in range(listeners)]
    deadline = time.monotonic() + 60

    def listen(ledger):  # small pages: every listener walks its cursor through many polls
        connection = HttpConnection(server.port)
        cursor = 0
        try:
            while cursor < posts and time.monotonic() < deadline:
                status, _headers, body = connection.request(
                    "GET", "/rooms/burst/msgs?since=%d&timeout=10&limit=7" % cursor)
                assert status == 200 and body["missed"] == 0 and "reset" not in body
                for message in body["messages"]:
                    ledger.record(message["id"])
                cursor = body["cursor"]
        finally:
            connection.close()

    greenlets = [gevent.spawn(listen, ledger) for ledger in ledgers]
    wait_for_waiters(server, listeners)
    poster = HttpConnection(server.port)
    for number in range(1, posts + 1):  # pipelined on one keep-alive connection: back to back
        poster.send("POST", "/rooms/burst/msgs", {"from": "poster", "content": "burst %d" % number})
    for number in range(1, posts + 1):
        status, _headers, body = poster.receive()
        assert status == 201 and body["id"] == number
    poster.close()
    gevent.joinall(greenlets, timeout=90, raise_error=True)
    summary = delivery_summary(ledgers, lambda ledger: posts)
    assert summary["complete"], summary
    assert summary["received"] == listeners * posts


def test_keep_alive_serves_several_requests_on_one_connection(start_chattle):
    server = start_chattle()
    connection = HttpConnection(server.port)
    status, headers, body = connection.request("GET", "/health")
    assert status == 200 and body["status"] == "ok" and headers.get("connection", "").lower() != "close"
    status, _headers, body = connection.request("POST", "/rooms/ka/msgs", {"from": "ann", "content": "one"})
    assert status == 201 and body["id"] == 1
    status, _headers, body = connection.request("GET", "/rooms/ka/msgs?since=0")
    assert status == 200 and [message["content"] for message in body["messages"]] == ["one"]
    status, _headers, body = connection.request("GET", "/nope")
    assert status == 404 and "error" in body
    status, _headers, body = connection.request("GET", "/rooms/a%20b/msgs?since=0")
    assert status == 404 and "error" in body
    status, _headers, body = connection.request("GET", "/stats")
    assert status == 200
    connection.close()


def test_oversized_body_is_refused_and_the_connection_closed(start_chattle):
    server = start_chattle()
    connection = HttpConnection(server.port)
    head = ("POST /msgs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 10000000\r\n\r\n").encode()
    connection.sock.sendall(head + b'{"from": "ann", "content": "' + b"x" * 1000)
    status, headers, body = connection.receive()  # answered without the other 9.99 MB
    assert status == 413 and "16384" in body["error"]
    assert headers.get("connection", "").lower() == "close"
    assert connection.server_closed(within=10)
    connection.close()
    assert stats(server)["messages"] == 0


def test_oversized_chunked_body_is_413(start_chattle):
    server = start_chattle()
    connection = HttpConnection(server.port)
    head = ("POST /msgs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b" " * 4096
    connection.sock.sendall(head + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5)))
    status, _headers, body = connection.receive()
    assert status == 413 and "error" in body
    connection.close()
    assert stats(server)["messages"] == 0


def test_a_stalled_body_is_answered_and_the_connection_closed(start_chattle):
    """A client that promises a body and stops sending gets a 400 after the read timeout,
    and the connection is closed rather than waited on for the rest."""
    server = start_chattle()
    connection = HttpConnection(server.port)
    connection.sock.sendall(b"POST /msgs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 100\r\n\r\n" + b'{"from": "ann"')
    status, headers, body = connection.receive()
    assert status == 400 and "did not arrive" in body["error"]
    assert headers.get("connection", "").lower() == "close"
    assert connection.server_closed(within=10)
    connection.close()
    assert stats(server)["waiters"] == 0 and stats(server)["messages"] == 0


def test_a_chunked_post_in_pieces_is_accepted(start_chattle):
    """A valid chunked body, sent in pieces smaller than a chunk header, is read whole by
    the server's request reader (pywsgi reads chunk sizes a byte at a time)."""
    server = start_chattle()
    connection = HttpConnection(server.port)
    body = json.dumps({"from": "ann", "content": "in chunks"}).encode()
    wire = (b"POST /rooms/chunks/msgs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (10, body[:10]) + b"%x\r\n%s\r\n" % (len(body) - 10, body[10:]) + b"0\r\n\r\n")
    for start in range(0, len(wire), 7):
        connection.sock.sendall(wire[start:start + 7])
        gevent.sleep(0.001)
    status, _headers, answer = connection.receive()
    assert status == 201 and answer["id"] == 1
    connection.close()
    status, answer = get_json(server.url + "/rooms/chunks/msgs?since=0")
    assert status == 200 and answer["messages"][0]["content"] == "in chunks"


def test_pipelined_polls_on_one_connection_are_answered_in_order(start_chattle):
    server = start_chattle()
    post(server, "pipe")
    connection = HttpConnection(server.port)
    connection.sock.sendall(b"GET /rooms/pipe/msgs?since=0&timeout=0 HTTP/1.1\r\nHost: t\r\n\r\n"
                            b"GET /rooms/pipe/msgs?since=1&timeout=0 HTTP/1.1\r\nHost: t\r\n\r\n")
    first = connection.receive()
    second = connection.receive()
    assert first[0] == second[0] == 200
    assert [m["id"] for m in first[2]["messages"]] == [1] and second[2]["messages"] == []
    connection.close()


def test_an_http_10_poll_is_answered_and_closed(start_chattle):
    server = start_chattle()
    post(server, "old")
    connection = HttpConnection(server.port)
    connection.sock.sendall(b"GET /rooms/old/msgs?since=0 HTTP/1.0\r\n\r\n")
    status, headers, body = connection.receive()
    assert status == 200 and body["cursor"] == 1
    assert headers.get("connection", "").lower() == "close"
    assert connection.server_closed(within=10)
    connection.close()
