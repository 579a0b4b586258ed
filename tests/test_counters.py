"""Deterministic counters of the Event-based broadcast path, which timing noise cannot blur.

A fan-out to N polls parked on one cursor must encode its answer once, allocate a
bounded number of bytes per waiter and switch greenlets a bounded number of times per
waiter. `broadcast_violations` returns what broke, so the tests below can also show
that an injected extra encode, allocation or switch is caught.
"""

import tracemalloc

import gevent
import greenlet
import pytest

import chattle

WAITERS = 1000
# Measured on this tree (gevent 26.9, greenlet 3.5): 231 bytes peak traced allocation and
# exactly 4 greenlet switches per waiter (the hub runs the Event's notifier, which
# switches into the waiter; the waiter switches back when its answer is made and again as
# the greenlet ends). The byte bound leaves room for interpreter differences, not for a
# private copy of the body; the switch bound admits no extra trip through the hub.
MAX_BYTES_PER_WAITER = 1024
MAX_SWITCHES_PER_WAITER = 4


def fan_out_counters(waiters=WAITERS):
    """Park `waiters` greenlets on one cursor, post once, and count what the wake-up cost."""
    room = chattle.rooms.get("counters")
    bus = chattle.get_bus()
    bus.publish("counters", "ann", "before")
    since = room.last_id
    bodies = []

    def poll():
        room.wait_for_news(since, 30)
        bodies.append(room.answer(since, 100))

    parked = [gevent.spawn(poll) for _ in range(waiters)]
    deadline = 200
    while chattle.rooms.waiters < waiters and deadline:
        gevent.sleep(0.01)
        deadline -= 1
    assert chattle.rooms.waiters == waiters, "waiters did not all park"

    switches = [0]

    def count_switch(event, _args):
        if event in ("switch", "throw"):
            switches[0] += 1

    encodes_before = chattle.rooms.encodes
    tracemalloc.start(1)
    tracemalloc.reset_peak()
    start_bytes = tracemalloc.get_traced_memory()[0]
    previous_trace = greenlet.settrace(count_switch)
    try:
        bus.publish("counters", "bob", "wake")
        gevent.joinall(parked, timeout=30)
    finally:
        greenlet.settrace(previous_trace)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return {
        "waiters": waiters,
        "answered": len(bodies),
        "distinct_bodies": len({id(body) for body in bodies}),
        "encodes": chattle.rooms.encodes - encodes_before,
        "bytes_per_waiter": (peak - start_bytes) / waiters,
        "switches_per_waiter": switches[0] / waiters,
    }


def broadcast_violations(counters):
    """What the counters of one fan-out break, as readable sentences (empty: all good)."""
    found = []
    if counters["answered"] != counters["waiters"]:
        found.append("%d of %d waiters answered" % (counters["answered"], counters["waiters"]))
    if counters["encodes"] != 1:
        found.append("%d JSON encodings for one cursor (want 1)" % counters["encodes"])
    if counters["bytes_per_waiter"] > MAX_BYTES_PER_WAITER:
        found.append("%.0f bytes allocated per waiter (bound %d)" % (counters["bytes_per_waiter"],
                                                                    MAX_BYTES_PER_WAITER))
    if counters["switches_per_waiter"] > MAX_SWITCHES_PER_WAITER:
        found.append("%.2f greenlet switches per waiter (bound %d)" % (counters["switches_per_waiter"],
                                                                      MAX_SWITCHES_PER_WAITER))
    return found


def test_fan_out_to_one_cursor_stays_within_its_counters(app_state):
    counters = fan_out_counters()
    print("fan-out counters:", counters)
    assert counters["distinct_bodies"] == 1, "every waiter must get the same encoded body"
    assert broadcast_violations(counters) == []


def test_an_answer_cache_that_is_bypassed_is_caught(app_state, monkeypatch):
    encode = chattle.Room._encode_answer
    monkeypatch.setattr(chattle.Room, "answer", lambda self, since, limit: encode(self, since, limit))
    found = broadcast_violations(fan_out_counters())
    assert any("JSON encodings" in violation for violation in found), found


def test_an_extra_allocation_per_waiter_is_caught(app_state, monkeypatch):
    answer = chattle.Room.answer

    def wasteful_answer(self, since, limit):
        body = answer(self, since, limit)
        return bytes(body) + b" " * 8192  # a private copy per waiter, as a careless change would make

    monkeypatch.setattr(chattle.Room, "answer", wasteful_answer)
    found = broadcast_violations(fan_out_counters())
    assert any("bytes allocated" in violation for violation in found), found


def test_an_extra_switch_per_waiter_is_caught(app_state, monkeypatch):
    wait = chattle.Room.wait_for_news

    def yielding_wait(self, since, timeout):
        wait(self, since, timeout)
        gevent.sleep(0)  # a needless trip through the hub after every wake-up

    monkeypatch.setattr(chattle.Room, "wait_for_news", yielding_wait)
    found = broadcast_violations(fan_out_counters())
    assert any("switches" in violation for violation in found), found


@pytest.mark.parametrize("waiters", [10, 100])
def test_one_encode_whatever_the_fan_out(app_state, waiters):
    assert fan_out_counters(waiters)["encodes"] == 1


# -- the timing gate itself: `make regress` must fail when the broadcast path slows down ----

def run_gate(storage, *extra, slowdown_us=0):
    import os
    import subprocess
    import sys

    env = dict(os.environ, CHATTLE_BENCH_SLOWDOWN_US=str(slowdown_us))
    env.pop("PYTEST_ADDOPTS", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "bench.regress", "--storage", str(storage),
                           "-k", "in_process and 100 and not 1000", *extra],
                          cwd=root, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_regress_gate_fails_when_the_broadcast_path_is_slower(tmp_path):
    first = run_gate(tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "no baseline on this machine yet" in first.stdout  # a missing baseline is not a failure

    # 100 us of busy work per answer: about 10 ms more per fan-out to 100 waiters, several
    # times the ~2 ms the path costs, far beyond any threshold the noise can set (<= 100 %).
    slowed = run_gate(tmp_path, slowdown_us=100)
    assert slowed.returncode != 0, slowed.stdout + slowed.stderr
    assert "SLOWER, FAILS" in slowed.stdout, slowed.stdout


# -- the pywsgi handler: bytes held per parked poll, work per answer -------------------------

HELD_POLLS = 200
# Measured in-process on this tree (gevent 26.9, Python 3.11), server and client side
# together: about 13.3 KB traced per held poll; 16.4 KB with bottle's request/response in
# gevent.local (a dict and weak reference per local per greenlet); 23.1 KB with pywsgi's
# own handler as well (its 8 KiB read buffer per connection). The bound admits neither.
MAX_BYTES_PER_HELD_POLL = 13 * 1024
# About 129 Python calls per answered GET with chattle's handler, 194 with pywsgi's own
# (email.feedparser header parsing, access-log formatting even with no log).
MAX_CALLS_PER_ANSWER = 160


def held_poll_bytes(handler_class, held=HELD_POLLS):
    """Park `held` real polls on a socket server in this process; traced bytes per poll."""
    from gevent import socket
    from gevent.pywsgi import WSGIServer

    server = WSGIServer(("127.0.0.1", 0), chattle.app, handler_class=handler_class, log=None)
    server.start()
    clients = []
    try:
        chattle.get_bus().publish("held", "ann", "before")
        since = chattle.rooms.get("held").last_id
        request = ("GET /rooms/held/msgs?since=%d&timeout=30 HTTP/1.1\r\nHost: t\r\n"
                   "User-Agent: held-poll-counter\r\nAccept: application/json\r\n\r\n" % since).encode()
        tracemalloc.start(1)
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(held):
            client = socket.create_connection(("127.0.0.1", server.server_port))
            client.sendall(request)
            clients.append(client)
        for _ in range(3000):
            if chattle.rooms.waiters >= held:
                break
            gevent.sleep(0.01)
        parked = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert chattle.rooms.waiters == held, "polls did not all park"
        chattle.get_bus().publish("held", "bob", "wake")
        for client in clients:
            client.settimeout(30)
            assert client.recv(4096).startswith(b"HTTP/1.1 200 OK")
        return (parked - before) / held
    finally:
        for client in clients:
            client.close()
        server.stop(timeout=1)


def calls_per_answer(handler_class, requests=20):
    """Python function calls made to answer one GET poll (no wait), over `requests`
    requests on one keep-alive connection that this greenlet serves itself."""
    import sys

    from gevent import socket
    from gevent.pywsgi import WSGIServer

    server = WSGIServer(("127.0.0.1", 0), chattle.app, handler_class=handler_class, log=None)
    chattle.get_bus().publish("calls", "ann", "hello")
    ours, theirs = socket.socketpair()
    theirs.sendall(b"GET /rooms/calls/msgs?limit=10 HTTP/1.1\r\nHost: t\r\nUser-Agent: call-counter\r\n"
                   b"Accept: application/json\r\n\r\n" * requests)
    theirs.shutdown(socket.SHUT_WR)
    counted = [0]

    def count(_frame, event, _arg):
        if event == "call":
            counted[0] += 1

    handler = handler_class(ours, ("127.0.0.1", 1), server)
    sys.setprofile(count)
    try:
        handler.handle()
    finally:
        sys.setprofile(None)
    received = b""
    while True:
        chunk = theirs.recv(65536)
        if not chunk:
            break
        received += chunk
    theirs.close()
    assert received.count(b"HTTP/1.1 200 OK") == requests
    return counted[0] / requests


def test_a_held_poll_holds_few_bytes(app_state):
    per_poll = held_poll_bytes(chattle.pywsgi_handler_class())
    print("traced bytes per held poll:", per_poll)
    assert per_poll <= MAX_BYTES_PER_HELD_POLL


def test_pywsgis_own_handler_would_break_the_held_poll_bound(app_state):
    from gevent.pywsgi import WSGIHandler

    assert held_poll_bytes(WSGIHandler) > MAX_BYTES_PER_HELD_POLL


def test_bottles_thread_locals_would_break_the_held_poll_bound(app_state, monkeypatch):
    import bottle

    for cls, names in chattle.BOTTLE_LOCAL_STATE:
        for name in names:
            monkeypatch.setattr(cls, name, bottle._local_property())
    assert held_poll_bytes(chattle.pywsgi_handler_class()) > MAX_BYTES_PER_HELD_POLL


def test_an_answer_takes_few_calls(app_state):
    per_answer = calls_per_answer(chattle.pywsgi_handler_class())
    print("python calls per answer:", per_answer)
    assert per_answer <= MAX_CALLS_PER_ANSWER


def test_pywsgis_own_handler_would_break_the_call_bound(app_state):
    from gevent.pywsgi import WSGIHandler

    assert calls_per_answer(WSGIHandler) > MAX_CALLS_PER_ANSWER


def test_no_plugin_wraps_a_route():
    # Each plugin wrapper is one more call per answer, and per woken poll in a fan-out.
    assert all(route.call is route.callback for route in chattle.app.routes)
