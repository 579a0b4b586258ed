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
