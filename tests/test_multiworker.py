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
        tests/test_multiworker.py -q -s
"""

import http.client
import json
import os
import time

import gevent
from gevent.pool import Pool

from bench.measures import DeliveryLedger, delivery_summary, latency_summary, wakeup_latency

LISTENERS = int(os.environ.get("CHATTLE_TEST_LISTENERS", "200"))
MESSAGES = int(os.environ.get("CHATTLE_TEST_MESSAGES", "300"))
WORKERS = 4
POSTERS = 4            # concurrent posting connections
RUN_DEADLINE = float(os.environ.get("CHATTLE_TEST_DEADLINE", "240"))  # a bound on the whole run, not a speed claim


class Listener:
    """One client following one room by cursor; reconnects and resumes after any error."""

    def __init__(self, server, room, poll_timeout=5.0):
        self.host, self.port = "127.0.0.1", server.port
        self.room = room
        self.poll_timeout = poll_timeout
        self.ledger = DeliveryLedger(0)
        self.cursor = 0
        self.contents = {}          # id -> content as received
        self.resets = 0
        self.reconnects = 0
        self.errors = 0             # non-200 answers (503 while a bus is down)
        self.worker_pid = None
        self.latencies = []
        self.connection = None
        self.polls_started = 0

    def _connect(self):
        self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.poll_timeout + 15)

    def _drop(self):
        if self.connection is not None:
            self.connection.close()
        self.connection = None

    def get(self, path):
        if self.connection is None:
            self._connect()
        self.connection.request("GET", path)
        answer = self.connection.getresponse()
        return answer.status, json.loads(answer.read())

    def identify(self):
        """Which worker this listener's connection landed on (kept alive, so it stays)."""
        try:
            _status, stats = self.get("/stats")
            self.worker_pid = stats["pid"]
        except (OSError, http.client.HTTPException, ValueError):
            self._drop()

    def follow(self, done, deadline):
        while not done(self) and time.monotonic() < deadline:
            try:
                self.polls_started += 1
                status, body = self.get("/rooms/%s/msgs?since=%d&timeout=%g&limit=1000"
                                        % (self.room, self.cursor, self.poll_timeout))
            except (OSError, http.client.HTTPException, ValueError):
                self.reconnects += 1
                self._drop()
                gevent.sleep(0.1)
                continue
            if status != 200:
                self.errors += 1
                self._drop()
                gevent.sleep(0.2)
                continue
            received_at = time.time()
            if body.get("reset"):
                self.resets += 1
            for message in body["messages"]:
                self.ledger.record(message["id"])
                self.latencies.append(wakeup_latency(received_at, message["ts"]))
                if self.contents.setdefault(message["id"], message["content"]) != message["content"]:
                    self.ledger.duplicated += 1  # the same id came back with other content
            self.cursor = body["cursor"]
        self._drop()


def post_once(port, room, content, timeout=10.0):
    """One post on a fresh connection, so posts spread over the workers. (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/rooms/%s/msgs" % room, body=json.dumps({"from": "poster", "content": content}),
                           headers={"Content-Type": "application/json", "Connection": "close"})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read()), answer.getheader("Retry-After")
    finally:
        connection.close()


class Poster:
    """Posts numbered messages; remembers what each accepted id carried."""

    def __init__(self, port, room):
        self.port, self.room = port, room
        self.acknowledged = {}      # id -> content
        self.duplicate_ids = 0      # the same id handed out twice (only a diverged bus does that)
        self.refused = 0            # 503s
        self.failed = 0             # connection errors
        self.sent = 0

    def post(self, content):
        self.sent += 1
        try:
            status, body, _retry_after = post_once(self.port, self.room, content)
        except (OSError, http.client.HTTPException, ValueError):
            self.failed += 1
            return None
        if status != 201:
            self.refused += 1
            return None
        if body["id"] in self.acknowledged:
            self.duplicate_ids += 1
        self.acknowledged[body["id"]] = content
        return body["id"]

    def burst(self, count, concurrency=POSTERS, pause=0.0):
        pool = Pool(concurrency)
        for number in range(count):
            pool.spawn(self.post, "message %d" % number)
            if pause:
                gevent.sleep(pause)
        pool.join()


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
    gevent.sleep(0.5)  # let the first polls be held, so posts wake them
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
    server = start_chattle(workers=WORKERS, env={"CHATTLE_HISTORY": str(MESSAGES + 100)})
    listeners, messages = min(LISTENERS, 100), min(MESSAGES, 100)
    poster, followers = run_room(server, "split", listeners, messages, catch_up=3.0)
    summary, spread = describe(poster, followers)
    # Each worker numbers its own posts: the same id is handed out for different
    # messages, and a listener sees only its own worker's share.
    mismatched = sum(1 for f in followers
                     if any(poster.acknowledged.get(i) != c for i, c in f.contents.items()))
    assert poster.duplicate_ids > 0 or mismatched > 0 or not summary["complete"], summary
