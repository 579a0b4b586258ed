"""Many gunicorn workers, one history: the issue's "done when", at test size.

Listeners on separate connections (the kernel spreads them over the workers) follow one
room while a poster bursts messages through fresh connections (so the posts land on
every worker). On the shared Redis bus every listener gets every id exactly once, in
order, with the content that was posted under it. On the in-memory bus the same run
shows the divergence the seed warned of.

Full size (1000 listeners x 2000 messages), by hand; every post wakes every listener, so on
a small machine the run is CPU bound for minutes:
    CHATTLE_TEST_LISTENERS=1000 CHATTLE_TEST_MESSAGES=2000 CHATTLE_TEST_DEADLINE=1500 \
        .venv/bin/python -m pytest \
        tests/server/test_multiworker.py -q -s
"""

import os
import time

import gevent

from clients import Listener, Poster, wait_for_waiters_across_workers
from instruments.measures import delivery_summary, latency_summary

LISTENERS = int(os.environ.get("CHATTLE_TEST_LISTENERS", "200"))
MESSAGES = int(os.environ.get("CHATTLE_TEST_MESSAGES", "300"))
WORKERS = 4
RUN_DEADLINE = float(os.environ.get("CHATTLE_TEST_DEADLINE", "240"))  # a bound on the whole run, not a speed claim


def run_room(server, room, listeners, messages, catch_up=RUN_DEADLINE):
    """Listeners follow `room` while a poster bursts `messages`; returns (poster, listeners)."""
    deadline = time.monotonic() + RUN_DEADLINE
    followers = [Listener(server, room) for _ in range(listeners)]
    gevent.joinall([gevent.spawn(f.identify) for f in followers], timeout=60)
    poster = Poster(server.port, room)
    finish = {}

    def done(listener):
        if "at" in finish and time.monotonic() > finish["at"]:
            return True  # the bus under test may never deliver some ids: stop waiting
        return "last" in finish and listener.cursor >= finish["last"]

    following = [gevent.spawn(f.follow, done, deadline) for f in followers]
    # the first polls held before the burst, so posts wake them (a poll that comes late
    # still gets every message by its cursor: this is about what is exercised)
    wait_for_waiters_across_workers(server, listeners)
    poster.burst(messages)
    finish["last"] = max(poster.acknowledged, default=0)
    finish["at"] = time.monotonic() + catch_up  # an upper bound only: listeners that are done stop
    gevent.joinall(following, timeout=RUN_DEADLINE)
    return poster, followers


def describe(poster, followers):
    latencies = [value for f in followers for value in f.latencies]
    summary = delivery_summary([f.ledger for f in followers], lambda _ledger: max(poster.acknowledged, default=0))
    spread = {}
    for f in followers:
        spread[f.worker_pid] = spread.get(f.worker_pid, 0) + 1
    figures = latency_summary(latencies)
    print("\ndelivery %s; listeners per worker %s; posts acknowledged %d of %d; wake-up latency "
          "p50 %.1f ms p99 %.1f ms max %.1f ms"
          % (summary, sorted(spread.values()), len(poster.acknowledged), poster.sent,
             1000 * (figures["p50"] or 0), 1000 * (figures["p99"] or 0), 1000 * (figures["max"] or 0)))
    return summary, spread


def test_shared_bus_delivers_every_id_once_in_order_to_every_listener(start_chattle, redis_server):
    server = start_chattle(workers=WORKERS, redis_url=redis_server.url,
                           env={"CHATTLE_HISTORY": str(MESSAGES + 100)})
    started = time.monotonic()
    poster, followers = run_room(server, "shared", LISTENERS, MESSAGES)
    summary, _spread = describe(poster, followers)
    print("run took %.1f s" % (time.monotonic() - started))
    assert sorted(poster.acknowledged) == list(range(1, MESSAGES + 1))
    assert poster.duplicate_ids == 0
    assert summary["complete"], summary
    for listener in followers:
        assert listener.contents == poster.acknowledged
        assert listener.resets == 0


def test_memory_bus_under_many_workers_diverges(start_chattle):
    # gunicorn.conf.py refuses this without CHATTLE_SPLIT_HISTORY=1 (tests/server/test_boot.py)
    server = start_chattle(workers=WORKERS, env={"CHATTLE_HISTORY": str(MESSAGES + 100), "CHATTLE_SPLIT_HISTORY": "1"})
    listeners, messages = min(LISTENERS, 100), min(MESSAGES, 100)
    poster, followers = run_room(server, "split", listeners, messages, catch_up=3.0)
    summary, spread = describe(poster, followers)
    # Each worker numbers its own posts: the same id is handed out for different
    # messages, and a listener sees only its own worker's share.
    mismatched = sum(1 for f in followers
                     if any(poster.acknowledged.get(i) != c for i, c in f.contents.items()))
    assert poster.duplicate_ids > 0 or mismatched > 0 or not summary["complete"], summary
