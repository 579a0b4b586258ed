"""Faults under real gunicorn workers on the shared Redis bus: nothing accepted is lost.

Each test breaks one part on purpose (a worker killed, the master stopped, Redis stopped
or restarted) while clients keep going, and judges delivery with the one ledger the
project has (instruments.measures.DeliveryLedger).
"""

import os
import signal
import time

import gevent

from clients import Listener, Poster, post_once, room_last_id, wait_for_waiters_across_workers
from harness.processes import get_json, wait_until


def follow_all(followers, target, deadline_seconds):
    deadline = time.monotonic() + deadline_seconds
    return [gevent.spawn(f.follow, lambda f: "last" in target and f.cursor >= target["last"], deadline)
            for f in followers]


def assert_delivered_exactly_once(followers, poster, last_id):
    for listener in followers:
        ledger = listener.ledger
        assert ledger.complete(last_id), (listener.worker_pid, ledger.lost(last_id), ledger.duplicated,
                                          ledger.out_of_order, listener.cursor)
        for message_id, content in poster.acknowledged.items():
            assert listener.contents.get(message_id) == content


def test_a_killed_worker_loses_no_message(start_chattle, redis_server):
    server = start_chattle(workers=3, redis_url=redis_server.url)
    followers = [Listener(server, "kill", poll_timeout=3) for _ in range(30)]
    gevent.joinall([gevent.spawn(f.identify) for f in followers], timeout=30)
    target = {}
    following = follow_all(followers, target, 120)
    poster = Poster(server.port, "kill")
    posting = gevent.spawn(poster.burst, 150, 2, 0.02)
    wait_until(lambda: len(poster.acknowledged) >= 50, 60, "posts flowing")
    victim = followers[0].worker_pid
    os.kill(victim, signal.SIGKILL)
    posting.join(timeout=120)
    wait_until(lambda: victim not in server.worker_pids() and len(server.worker_pids()) == 3, 60,
             "gunicorn replaced the killed worker")
    target["last"] = room_last_id(server, "kill")
    gevent.joinall(following, timeout=120)
    assert len(poster.acknowledged) >= 140  # a few posts may die with the worker; they are not judged
    assert sum(f.reconnects for f in followers) >= sum(1 for f in followers if f.worker_pid == victim)
    assert target["last"] >= len(poster.acknowledged)
    assert_delivered_exactly_once(followers, poster, target["last"])


def test_sigterm_to_the_master_answers_held_polls_promptly(start_chattle, redis_server):
    server = start_chattle(workers=2, redis_url=redis_server.url)
    assert post_once(server.port, "term", "before")[0] == 201
    answers = []

    def hold():
        listener = Listener(server, "term", poll_timeout=60)
        try:
            answers.append(listener.get("/rooms/term/msgs?since=1&timeout=60")[0])
        except Exception as exc:  # a closed connection is a clean end too
            answers.append(type(exc).__name__)

    holders = [gevent.spawn(hold) for _ in range(20)]
    wait_for_waiters_across_workers(server, 20)
    assert not answers  # they are held
    stopped_at = time.monotonic()
    server.signal(signal.SIGTERM)
    # The graceful timeout is 75 s; 20 s is a generous bound that still proves it was not waited out.
    gevent.joinall(holders, timeout=20)
    assert len(answers) == 20, answers
    closed_cleanly = {"RemoteDisconnected", "ConnectionResetError", "IncompleteRead", "BadStatusLine"}
    assert set(answers) <= {200} | closed_cleanly, answers
    wait_until(lambda: not server.alive(), 30, "the master exited")
    assert time.monotonic() - stopped_at < 60


def test_redis_outage_and_restarts_lose_nothing_and_reuse_no_id(start_chattle, redis_server, tmp_path):
    server = start_chattle(workers=2, redis_url=redis_server.url)
    poster = Poster(server.port, "out")
    for n in range(3):
        poster.post("before %d" % n)
    assert sorted(poster.acknowledged) == [1, 2, 3]
    followers = [Listener(server, "out", poll_timeout=2) for _ in range(10)]
    gevent.joinall([gevent.spawn(f.identify) for f in followers], timeout=30)
    target = {}
    following = follow_all(followers, target, 120)
    wait_until(lambda: all(f.cursor == 3 for f in followers), 30, "listeners caught up")

    redis_server.stop()
    for _ in range(6):  # fresh connections, so both workers answer some
        status, body, retry_after = post_once(server.port, "out", "during the outage")
        assert status == 503 and retry_after and "error" in body, (status, body)
    wait_until(lambda: get_json(server.url + "/health")[0] == 503, 30, "health degraded")
    assert get_json(server.url + "/health")[1]["status"] == "degraded"
    polls_before = sum(f.polls_started for f in followers)
    wait_until(lambda: sum(f.polls_started for f in followers) >= polls_before + 2 * len(followers), 30,
             "held polls end at their timeout and poll again")
    assert all(not f.ledger.duplicated for f in followers)

    redis_server.restart()  # same port and directory: the AOF replays
    wait_until(lambda: all(get_json(server.url + "/health")[0] == 200 for _ in range(4)), 30, "health back")
    assert poster.post("after the outage") == 4  # nothing was written during it, no id reused
    target["last"] = 4
    gevent.joinall(following, timeout=60)
    assert_delivered_exactly_once(followers, poster, 4)

    server.stop()  # every worker gone: the history lives on in Redis
    again = start_chattle(workers=2, redis_url=redis_server.url)
    status, body = get_json(again.url + "/rooms/out/msgs?since=0&timeout=0")
    assert [m["id"] for m in body["messages"]] == [1, 2, 3, 4]
    assert [m["content"] for m in body["messages"]] == [poster.acknowledged[i] for i in (1, 2, 3, 4)]
    assert post_once(again.port, "out", "after the workers' restart")[1]["id"] == 5
