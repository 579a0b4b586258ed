"""The shared bus on a real Redis Cluster: 3 masters and 3 replicas on loopback ports
(harness/redis_cluster.py), buses in the test process and real gunicorn workers on it.

Every wait is on a condition under a deadline; nothing here asserts how fast it went.
"""

import os
import signal
import sys
import time

import gevent
import gevent.event
import psutil
import pytest

import chattle
from clients import Listener, Poster, close_all, connections_to_each_worker, post_once
from harness import failover
from harness.processes import ROOT, Process, free_port, get_json, wait_until
from harness.redis_cluster import ClusterNode, RedisCluster
from instruments.measures import delivery_summary

ROOMS = int(os.environ.get("CHATTLE_TEST_CLUSTER_ROOMS", "10"))
LISTENERS = int(os.environ.get("CHATTLE_TEST_CLUSTER_LISTENERS", "300"))
POSTS_PER_ROOM = int(os.environ.get("CHATTLE_TEST_CLUSTER_POSTS", "100"))
RUN_DEADLINE = 240.0  # a bound on a run, not a speed claim


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, cannot_run):
    from harness import system_packages
    if not system_packages.find("redis-server"):
        cannot_run(system_packages.missing_line(["redis-server"]))
    started = RedisCluster(workdir=str(tmp_path_factory.mktemp("cluster")))
    yield started
    started.stop()


@pytest.fixture
def buses(cluster):
    """Buses on the cluster, each with its own rooms, as workers would have them."""
    made = []

    def make(history=50, wait_ms=0):
        bus = chattle.RedisClusterBus(chattle.Rooms(history), cluster.seed, history, wait_ms=wait_ms)
        made.append(bus)
        wait_until(lambda: len(bus.readers) == 3, 10.0, "a reader per master")
        return bus

    yield make
    for bus in made:
        bus.close()


def rooms_on_each_master(bus, count=1, prefix="r"):
    """{master's name: [room names on it]}: `count` rooms for each master, named `prefix`<n>
    (a prefix of its own per test: the tests of this module share one cluster)."""
    found = {}
    for number in range(10000):
        name = "%s%d" % (prefix, number)
        node = bus._master_of(bus.room_keys(name)[0])
        if len(found.setdefault(node.name, [])) < count:
            found[node.name].append(name)
        if len(found) == 3 and all(len(names) == count for names in found.values()):
            return found
    raise AssertionError("rooms of every master not found")


# -- in process ------------------------------------------------------------------------------

def test_the_settings_refuse_both_buses_and_a_negative_wait():
    with pytest.raises(SystemExit, match="not both"):
        chattle.Settings(redis="redis://127.0.0.1:6379/0", redis_cluster="127.0.0.1:7000")
    with pytest.raises(SystemExit, match="--redis-wait"):
        chattle.Settings(redis_cluster="127.0.0.1:7000", redis_wait=-1)
    with pytest.raises(SystemExit, match="host:port"):
        chattle.RedisClusterBus(chattle.Rooms(10), "no-port-here", 10)
    with pytest.raises(SystemExit, match="host:port"):
        chattle.RedisClusterBus(chattle.Rooms(10), "127.0.0.1:70000", 10)


def test_a_malformed_redis_url_stops_the_start_with_one_line_not_a_traceback():
    for url, reason in (("redis://:x", "Port could not be cast"), ("http://127.0.0.1:6379", "schemes")):
        with pytest.raises(SystemExit, match="is not a Redis URL .*%s.*for example redis://" % reason):
            chattle.Settings(redis=url)
    assert chattle.Settings(redis="redis://127.0.0.1:6379/0").redis


def test_every_master_holds_rooms_and_ids_stay_dense_across_workers(buses):
    first, second = buses(), buses()
    names = [name for names in rooms_on_each_master(first, 2, "dense").values() for name in names]
    copies = {name: (first.room(name, 0), second.room(name, 0)) for name in names}
    for number in range(20):
        for name in names:
            assert (first if number % 2 else second).publish(name, "ann", "m%d" % number)["id"] == number + 1
    for name, (mine, theirs) in copies.items():
        for room in (mine, theirs):
            wait_until(lambda room=room: room.last_id == 20, 10.0, "every post of %s delivered" % name)
        assert mine.answer(0, 100) == theirs.answer(0, 100)  # the same bytes in both workers
    assert set(first.readers) == set(first._masters()) and len(first.readers) == 3


def test_a_worker_is_given_the_posts_of_the_rooms_it_holds_and_no_others(buses):
    """The readers' cost does not grow with the rooms a worker does not hold: it holds one
    room while posts go to 20 others spread over the 3 masters, and it is given exactly
    the posts of its room. (Following a feed of every master's posts, it was given them all.)"""
    worker, poster = buses(), buses()
    others = sorted(name for names in rooms_on_each_master(poster, 7, "elsewhere").values() for name in names)[:20]
    assert len({poster._master_of(poster.room_keys(name)[0]).name for name in others}) == 3
    room = worker.room("held", 0)
    for number in range(5):
        for name in others:
            poster.publish(name, "ann", "m%d" % number)
        poster.publish("held", "bob", "h%d" % number)  # after the others' posts, on its master's connection
    wait_until(lambda: room.last_id == 5, 10.0, "the held room's posts")
    assert (worker.posts_received, worker.posts_received_for_rooms_not_held) == (5, 0)


def test_a_forgotten_room_is_unsubscribed_and_a_new_subscription_fetches_what_it_missed(buses):
    worker, poster = buses(), buses()
    forgotten, barrier = next(names for names in rooms_on_each_master(poster, 2, "forget").values())
    shard = worker.readers[poster._master_of(poster.room_keys(forgotten)[0]).name]
    worker.room(forgotten, 0)
    held = worker.room(barrier, 0)
    worker.forget(forgotten)
    wait_until(lambda: not shard.unsubscribing, 10.0, "the SUNSUBSCRIBE answered")
    poster.publish(forgotten, "ann", "not for this worker")
    poster.publish(barrier, "ann", "after it, on the same connection")
    wait_until(lambda: held.last_id == 1, 10.0, "the barrier room's post")
    assert (worker.posts_received, worker.posts_received_for_rooms_not_held) == (1, 0)
    # Its subscriber gone (as with a connection lost), posts meanwhile reach nobody; the
    # one that takes over subscribes, then fetches the room.
    shard.stop()
    for number in range(3):
        poster.publish(barrier, "ann", "while unsubscribed %d" % number)
    worker.topology_changed.set()
    wait_until(lambda: held.last_id == 4, 20.0, "the posts made while nothing was subscribed")
    assert worker.posts_received == 1
    poster.publish(barrier, "ann", "subscribed again")
    wait_until(lambda: worker.posts_received == 2 and held.last_id == 5, 10.0, "a post through the new subscriber")


def test_a_message_that_never_came_is_fetched_when_the_next_one_leaves_a_gap(buses):
    worker, poster = buses(), buses()
    room = worker.room("gap", 0)
    last_key, stream_key = poster.room_keys("gap")
    # the post script with its publishing left out: written, never published (as a post
    # with --redis-wait that no replica confirmed)
    poster.cluster.eval(poster.PUBLISH_SCRIPT, 4, last_key, stream_key, poster.epoch_key("gap"),
                        poster.rooms_key("gap"), "gap", "ann", "never published",
                        poster.history, poster.room_ttl, "0", poster.CHANNEL % "gap", poster.rooms_per_slot)
    assert poster.publish("gap", "ann", "published")["id"] == 2
    wait_until(lambda: room.last_id == 2, 10.0, "the room fetched up to the post after the gap")
    got = [m["content"] for m in chattle.json.loads(room.answer(0, 10))["messages"]]
    assert got == ["never published", "published"] and worker.posts_received == 1


def test_malformed_shard_messages_are_skipped_and_the_subscription_goes_on(buses):
    worker, poster = buses(), buses()
    room = worker.room("odd", 0)
    master = worker._master_of(worker.room_keys("odd")[0])
    shard = worker.readers[master.name]
    connection = shard.connection
    no_id = {"r": "odd", "i": "x", "f": "ann", "c": "x", "t": "1.5"}
    for payload in ("not json", "[1]", chattle.json.dumps({"r": "odd"}), chattle.json.dumps(no_id)):
        master.redis_connection.execute_command("SPUBLISH", worker.CHANNEL % "odd", payload)
    poster.publish("odd", "ann", "after them")
    wait_until(lambda: room.last_id == 1, 10.0, "the post after the malformed messages")
    # through the same subscription: no reconnect, no fetch
    assert shard.connection is connection and worker.readers[master.name] is shard
    state = worker.reader_state()
    assert (state["state"], state["malformed_entries"], state["restarts"], worker.posts_received) == ("ok", 4, 0, 1)


def test_a_shard_reader_that_fails_starts_again_and_fetches_its_rooms(buses):
    worker, poster = buses(), buses()
    room = worker.room("oops", 0)
    shard = worker.readers[worker._master_of(worker.room_keys("oops")[0]).name]
    real_apply = worker._apply
    failures = []

    def failing_apply(fields):
        if not failures:
            failures.append(fields["c"])
            raise RuntimeError("a bug in applying a message")
        return real_apply(fields)

    worker._apply = failing_apply
    poster.publish("oops", "ann", "the one it failed on")
    wait_until(lambda: room.last_id == 1, 10.0, "the message, fetched when the subscriber connected again")
    poster.publish("oops", "ann", "after it")
    wait_until(lambda: room.last_id == 2, 10.0, "a message through the new connection")
    state = worker.reader_state()
    assert (failures, state["restarts"], state["state"]) == (["the one it failed on"], 1, "ok")
    assert worker.readers[shard.master.name] is shard and not shard.greenlet.dead  # the same reader went on


def test_a_failed_load_or_catch_up_keeps_neither_the_room_nor_its_subscription(buses):
    import redis

    worker = buses()

    def down(*_args, **_kwargs):
        raise redis.ConnectionError("the room's master does not answer (the test says so)")

    def held(room_name):
        return room_name in worker.rooms.by_name or room_name in worker.loaded or room_name in worker.subscribed

    worker.publish("far", "ann", "x")
    assert chattle.json.loads(worker.room("far", 10 ** 9).answer(10 ** 9, 10))["reset"] is True  # a check that answers
    real_eval = worker.cluster.eval
    worker.cluster.eval = down  # the load's fetch fails
    with pytest.raises(chattle.BusUnavailable):
        worker.room("noload", 0)
    assert not held("noload")
    real_sync = worker._sync
    syncs = []

    def sync_then_down(room_name, room):
        syncs.append(room_name)
        if len(syncs) > 1:
            down()
        worker.cluster.eval = real_eval
        real_sync(room_name, room)
        worker.cluster.eval = worker.cluster.mget = down  # the catch-up after the load fails

    worker._sync = sync_then_down
    with pytest.raises(chattle.BusUnavailable):
        worker.room("nocatchup", 5)
    assert not held("nocatchup")
    wait_until(lambda: not any(name in reader.rooms for reader in worker.readers.values()
                               for name in ("noload", "nocatchup")), 10.0, "both unsubscribed")


def test_a_post_sent_again_with_its_key_is_posted_once_whichever_worker_takes_it(buses):
    first, second = buses(), buses()
    posted = first.publish("idem", "ann", "once", "k:{x}")
    assert second.publish("idem", "ann", "once", "k:{x}") == {"id": 1, "ts": posted["ts"], "epoch": posted["epoch"],
                                                              "replayed": True}
    assert second.publish("idem-other", "ann", "once", "k:{x}")["id"] == 1  # another room: posted
    assert first.publish("idem", "ann", "unkeyed")["id"] == 2
    assert first.cluster.xlen(first.room_keys("idem")[1]) == 2
    assert 0 < first.cluster.ttl("chattle:{idem}:idem:k:{x}") <= first.idempotency_seconds


def test_a_post_no_replica_confirmed_is_announced_when_its_retry_is(buses):
    """With WAIT, a post whose first sending no replica confirmed in time was written, not
    announced (its outcome unknown); its retry with the same key is confirmed, given the
    first one's id, and announced as the first sending wrote it."""
    poster, worker = buses(wait_ms=5000), buses(wait_ms=5000)
    room = worker.room("idem-waited", 0)
    last_key, stream_key = poster.room_keys("idem-waited")
    poster.cluster.eval(poster.PUBLISH_SCRIPT, 5, last_key, stream_key, poster.epoch_key("idem-waited"),
                        poster.rooms_key("idem-waited"), "chattle:{idem-waited}:idem:w", "idem-waited", "ann",
                        "first sending", poster.history, poster.room_ttl, "0", poster.CHANNEL % "idem-waited",
                        poster.rooms_per_slot, 60)
    assert poster.publish("idem-waited", "ann", "sent again", "w")["id"] == 1
    wait_until(lambda: room.last_id == 1, 10.0, "the post, announced once a replica confirmed it")
    assert [m["content"] for m in chattle.json.loads(room.answer(0, 10))["messages"]] == ["first sending"]
    assert poster.cluster.xlen(stream_key) == 1


def test_a_post_confirmed_by_a_replica_is_served_from_the_replicas(buses):
    """With WAIT, a worker reads what a replica holds: the subscribers are on the replicas."""
    poster, reader = buses(wait_ms=5000), buses(wait_ms=5000)
    room = reader.room("waited", 0)
    assert poster.publish("waited", "ann", "on a replica")["id"] == 1
    wait_until(lambda: room.last_id == 1, 10.0, "the post, read from a replica")
    sources = {shard.source.name for shard in reader.readers.values()}
    assert sources.isdisjoint(reader.readers) and len(sources) == 3  # no subscriber on a master
    assert reader.posts_received == 1  # published once the replica had it, and received


def test_a_cluster_not_ok_at_start_is_served_degraded_until_it_is(tmp_path):
    """A cluster that is not ok yet (one node, cluster-enabled, no slot: cluster_state:fail)
    stops neither `python chattle.py` nor gunicorn: they serve 503 with Retry-After, /health
    says why, and once the node holds every slot both serve, by themselves."""
    from harness.redis_cluster import command

    lone = ClusterNode(str(tmp_path))
    address = "127.0.0.1:%d" % lone.port
    env = dict(os.environ, CHATTLE_REDIS_CLUSTER=address, PYTHONUNBUFFERED="1")
    single_port, gunicorn_port = free_port(), free_port()
    started = [Process([sys.executable, os.path.join(ROOT, "chattle.py"), "--port", str(single_port)], env=env,
                       log_path=str(tmp_path / "single.log")),
               Process([sys.executable, "-m", "gunicorn", "--config", os.path.join(ROOT, "gunicorn.conf.py"),
                        "--bind", "127.0.0.1:%d" % gunicorn_port, "--workers", "2", "chattle"], env=env,
                       log_path=str(tmp_path / "gunicorn.log"))]
    try:
        for port, process in zip((single_port, gunicorn_port), started):
            url = "http://127.0.0.1:%d" % port
            wait_until(lambda url=url: get_json(url + "/health", 2)[0] == 503, 30.0, "degraded on %s" % url, process)
            for _each in range(4):  # fresh connections: both of gunicorn's workers answer some
                status, body = get_json(url + "/health")
                assert status == 503 and "not ok" in body["reason"] and "cluster_state:fail" in body["reason"], body
                status, body, retry_after = post_once(port, "lone", "not yet")
                assert status == 503 and retry_after == "1" and "not ok" in body["error"], body
        assert command(lone.port, "CLUSTER", "ADDSLOTSRANGE", "0", "16383").startswith("+OK")
        workers = {}
        try:
            for port, process in zip((single_port, gunicorn_port), started):
                pids = [child.pid for child in psutil.Process(process.pid).children()] or [process.pid]
                workers.update(connections_to_each_worker(port, pids))
            assert len(workers) == 3
            for pid, connection in sorted(workers.items()):
                wait_until(lambda connection=connection: connection.request("GET", "/health")[0] == 200, 30.0,
                           "worker %d serving once the cluster is ok" % pid)
                status, _headers, body = connection.request("POST", "/rooms/lone/msgs",
                                                            {"from": "ann", "content": "now"})
                assert status == 201, body  # no replica to wait for: answered at once
                status, _headers, polled = connection.request("GET", "/rooms/lone/msgs?since=0&timeout=0")
                assert status == 200 and polled["messages"][-1]["id"] == body["id"], polled
        finally:
            close_all(workers)
    finally:
        for process in started:
            process.stop()
        lone.stop()


def test_a_master_down_for_good_refuses_its_rooms_only(tmp_path, start_chattle):
    """No replica to promote: the dead master's rooms answer 503 with Retry-After, the others go on."""
    bare = RedisCluster(masters=3, replicas=0, workdir=str(tmp_path / "bare"))
    try:
        server = start_chattle(env={"CHATTLE_REDIS_CLUSTER": bare.seed})
        probe = chattle.RedisClusterBus(chattle.Rooms(10), bare.seed, 10)
        try:
            by_master = rooms_on_each_master(probe)
        finally:
            probe.close()
        doomed_name, doomed_rooms = sorted(by_master.items())[0]
        doomed = next(node for node in bare.nodes if "%s:%d" % ("127.0.0.1", node.port) == doomed_name)
        for names in by_master.values():
            assert post_once(server.port, names[0], "before")[0] == 201
        doomed.signal(9)
        doomed.popen.wait(10)

        def refused():
            status, body, retry_after = post_once(server.port, doomed_rooms[0], "after")
            return status == 503 and retry_after and "error" in body

        wait_until(refused, 30.0, "the dead master's room refused")
        for name, names in by_master.items():
            if name != doomed_name:
                status, body, _retry = post_once(server.port, names[0], "after")
                assert status == 201 and body["id"] == 2
                status, polled = get_json("%s/rooms/%s/msgs?since=1&timeout=5" % (server.url, names[0]), 10)
                assert status == 200 and [m["content"] for m in polled["messages"]] == ["after"]
        status, polled = get_json("%s/rooms/%s/msgs?since=1&timeout=1" % (server.url, doomed_rooms[0]), 10)
        assert status == 503
    finally:
        bare.stop()


# -- gunicorn on the cluster: the done-when -------------------------------------------------------

def follow_rooms(server, room_names, listeners, posts_per_room):
    """`listeners` spread over the rooms follow them while a poster per room bursts
    `posts_per_room` posts; returns (posters by room, listeners)."""
    deadline = time.monotonic() + RUN_DEADLINE
    followers = [Listener(server, room_names[number % len(room_names)]) for number in range(listeners)]
    gevent.joinall([gevent.spawn(f.identify) for f in followers], timeout=60)
    posters = {name: Poster(server.port, name) for name in room_names}
    finish = {}

    def done(listener):
        last = finish.get(listener.room)
        return last is not None and listener.cursor >= last

    following = [gevent.spawn(f.follow, done, deadline) for f in followers]
    wait_until(lambda: sum(get_json(server.url + "/stats")[1]["waiters"] for _ in range(1)) > 0, 30.0,
               "the first polls held")
    bursts = [gevent.spawn(poster.burst, posts_per_room, 2, 0.0, RUN_DEADLINE) for poster in posters.values()]
    gevent.joinall(bursts, timeout=RUN_DEADLINE, raise_error=True)
    for name, poster in posters.items():
        finish[name] = max(poster.acknowledged, default=0)
    gevent.joinall(following, timeout=RUN_DEADLINE)
    return posters, followers


@pytest.mark.slow
def test_two_gunicorn_workers_on_the_cluster_lose_and_duplicate_nothing(cluster, start_chattle):
    server = start_chattle(workers=2, env={"CHATTLE_REDIS_CLUSTER": cluster.seed,
                                           "CHATTLE_HISTORY": str(POSTS_PER_ROOM + 100)})
    probe = chattle.RedisClusterBus(chattle.Rooms(10), cluster.seed, 10)
    try:
        by_master = rooms_on_each_master(probe, (ROOMS + 2) // 3, "done")
    finally:
        probe.close()
    names = sorted(name for names in by_master.values() for name in names)[:ROOMS]
    started = time.monotonic()
    posters, followers = follow_rooms(server, names, LISTENERS, POSTS_PER_ROOM)
    took = time.monotonic() - started
    summary = delivery_summary([f.ledger for f in followers], lambda ledger: POSTS_PER_ROOM)
    workers = sorted({f.worker_pid for f in followers})
    print("\n%d listeners x %d posts over %d rooms on 3 masters, gunicorn x2 (listeners on %d workers): %s; "
          "%.1f s" % (LISTENERS, POSTS_PER_ROOM * ROOMS, ROOMS, len(workers), summary, took))
    for poster in posters.values():
        assert sorted(poster.acknowledged) == list(range(1, POSTS_PER_ROOM + 1))
        assert poster.duplicate_ids == 0 and poster.refused == 0 and poster.failed == 0
    assert summary["lost"] == 0 and summary["duplicated"] == 0 and summary["complete"], summary
    for listener in followers:
        assert listener.contents == posters[listener.room].acknowledged
        assert listener.resets == 0
    _status, stats = get_json(server.url + "/stats")
    assert stats["bus_posts_received"] > 0 and stats["bus_posts_received_for_rooms_not_held"] >= 0, stats


# -- a failover in the middle of a burst, every loss counted ---------------------------------------

class RoomPoster:
    """Posts numbered messages to one room, one at a time per greenlet, until told to stop;
    remembers when each was acknowledged (201) and when the room refused (503 or no answer)."""

    def __init__(self, port, room):
        self.port, self.room = port, room
        self.acknowledged = []      # (content, id, when the 201 came)
        self.refused = []           # when a post was not acknowledged
        self.answered_at = []       # when each 201 came, in order
        self.number = 0

    def run(self, stop):
        while not stop.is_set():
            self.number += 1
            content = "%s-%d" % (self.room, self.number)
            try:
                status, body, _retry = post_once(self.port, self.room, content)
            except Exception:
                status, body = None, None
            now = time.monotonic()
            if status == 201:
                self.acknowledged.append((content, body["id"], now))
                self.answered_at.append(now)
            else:
                self.refused.append(now)
                gevent.sleep(0.05)

    def longest_silence(self):
        """The longest time between two acknowledged posts: the room's time without service."""
        return failover.longest_silence(self.answered_at)


class RoomLedger:
    """One listener of one room: every content it was given, and when it was told it may
    have missed messages (`reset`, or `missed` above 0)."""

    def __init__(self, server, room):
        self.url = "%s/rooms/%s/msgs" % (server.url, room)
        self.room = room
        self.cursor = None
        self.received = {}          # content -> id it came under
        self.view = set()           # contents given since the last reset (the client's view)
        self.duplicated = 0
        self.signals = []           # when it was told
        self.errors = 0

    def follow(self, stop_at_cursor, deadline):
        _status, first = get_json(self.url + "?limit=1", 10)
        self.cursor = first["cursor"]
        self.started = time.monotonic()
        while time.monotonic() < deadline:
            target = stop_at_cursor.get(self.room)
            if target is not None and self.cursor >= target:
                return
            try:
                status, body = get_json("%s?since=%d&timeout=2&limit=1000" % (self.url, self.cursor), 15)
            except Exception:
                status, body = None, None
            if status != 200:
                self.errors += 1
                gevent.sleep(0.1)
                continue
            if body.get("reset") or body.get("missed"):
                self.signals.append(time.monotonic())
            if body.get("reset"):
                self.view = set()  # the client drops its view and starts over
            for message in body["messages"]:
                if message["content"] in self.view:
                    self.duplicated += 1
                self.view.add(message["content"])
                self.received[message["content"]] = message["id"]
            self.cursor = body["cursor"]

    def judge(self, acknowledged):
        """(delivered, signalled, lost) of the posts acknowledged after it started."""
        return failover.judge([(content, when) for content, _id, when in acknowledged if when >= self.started],
                              self.received.__contains__, self.signals)


def history_of(server, room, last):
    """Every content the room's history holds now, read page by page."""
    contents, cursor = set(), 0
    while cursor < last:
        status, body = get_json("%s/rooms/%s/msgs?since=%d&timeout=0&limit=1000" % (server.url, room, cursor), 10)
        assert status == 200, body
        contents.update(message["content"] for message in body["messages"])
        if body["cursor"] <= cursor:
            break
        cursor = body["cursor"]
    return contents


def failover_during_a_burst(tmp_path, start_chattle, wait_ms, before=150, after=150, lagging=False):
    """`lagging`: the replica is stopped (SIGSTOP) for 30 posts of the busiest room before
    its master dies, and continued after."""
    cluster = RedisCluster(workdir=str(tmp_path / "failover"))
    stop = gevent.event.Event()
    heir = None
    try:
        env = {"CHATTLE_REDIS_CLUSTER": cluster.seed, "CHATTLE_REDIS_WAIT": str(wait_ms),
               "CHATTLE_HISTORY": "2000"}
        server = start_chattle(workers=2, env=env)
        probe = chattle.RedisClusterBus(chattle.Rooms(10), cluster.seed, 10)
        try:
            by_master = rooms_on_each_master(probe, 2)
            busiest = sorted(by_master.values())[0][0]
            doomed_name = probe._master_of(probe.room_keys(busiest)[0]).name
        finally:
            probe.close()
        doomed = next(node for node in cluster.nodes if "127.0.0.1:%d" % node.port == doomed_name)
        heir = cluster.replica_of(doomed)
        names = sorted(name for names in by_master.values() for name in names)
        posters = {name: RoomPoster(server.port, name) for name in names}
        ledgers = [RoomLedger(server, name) for name in names for _ in range(10)]
        final = {}
        deadline = time.monotonic() + RUN_DEADLINE
        following = [gevent.spawn(ledger.follow, final, deadline) for ledger in ledgers]
        wait_until(lambda: all(ledger.cursor is not None for ledger in ledgers), 30.0, "listeners started")
        posting = [gevent.spawn(posters[name].run, stop) for name in names]
        posting += [gevent.spawn(posters[busiest].run, stop) for _ in range(2)]  # the busiest room
        wait_until(lambda: len(posters[busiest].acknowledged) >= before, 60.0, "the burst under way")
        refused_at_stall = len(posters[busiest].refused)
        if lagging:
            heir.signal(signal.SIGSTOP)
            answered = len(posters[busiest].acknowledged) + len(posters[busiest].refused)
            wait_until(lambda: len(posters[busiest].acknowledged) + len(posters[busiest].refused) >= answered + 30,
                       60.0, "posts answered while the replica lags")
        refused_while_stalled = len(posters[busiest].refused) - refused_at_stall
        # back as the new master's replica afterwards, as a supervisor would do
        continued = (lambda: heir.signal(signal.SIGCONT)) if lagging else None
        done = failover.fail_over(cluster, doomed, after_kill=continued)
        killed_at, promoted_at = done["killed_at"], done["promoted_at"]
        acknowledged_before = len(posters[busiest].acknowledged)
        wait_until(lambda: len(posters[busiest].acknowledged) >= acknowledged_before + after, 90.0,
                   "the busiest room served again")
        stop.set()
        gevent.joinall(posting, timeout=30)
        for name in names:
            final[name] = get_json("%s/rooms/%s/msgs?limit=1" % (server.url, name), 10)[1]["cursor"]
        gevent.joinall(following, timeout=RUN_DEADLINE)
        missing = 0  # acknowledged posts the room's history no longer holds
        for name in names:
            kept = history_of(server, name, final[name])
            missing += sum(1 for content, _id, _when in posters[name].acknowledged if content not in kept)
        totals = {"delivered": 0, "signalled": 0, "lost": 0, "duplicated": 0,
                  "acknowledged_missing_from_history": missing}
        for ledger in ledgers:
            delivered, signalled, lost = ledger.judge(posters[ledger.room].acknowledged)
            totals["delivered"] += delivered
            totals["signalled"] += signalled
            totals["lost"] += lost
            totals["duplicated"] += ledger.duplicated
        others = [posters[name] for name in names if posters[name] is not posters[busiest]
                  and name not in by_master[doomed_name]]
        totals["signals"] = sum(len(ledger.signals) for ledger in ledgers)
        report = dict(totals, acknowledged=sum(len(p.acknowledged) for p in posters.values()),
                      promoted_after_s=round(promoted_at - killed_at, 2),
                      busiest_room_without_service_s=round(posters[busiest].longest_silence(), 2),
                      busiest_room_refused_before_the_kill=refused_while_stalled,
                      other_masters_rooms_without_service_s=round(max(p.longest_silence() for p in others), 2),
                      other_masters_rooms_refused=sum(len(p.refused) for p in others))
        print("\nfailover%s, WAIT %d ms: %s" % (" with a lagging replica" if lagging else "", wait_ms, report))
        return report, ledgers, posters
    finally:
        stop.set()
        if heir is not None and heir.alive():
            heir.signal(signal.SIGCONT)
        cluster.stop()


@pytest.mark.slow
def test_a_failover_with_wait_loses_no_acknowledged_post(tmp_path, start_chattle):
    report, ledgers, _posters = failover_during_a_burst(tmp_path, start_chattle, wait_ms=1000)
    assert report["lost"] == 0 and report["duplicated"] == 0, report
    assert report["other_masters_rooms_refused"] == 0, report


@pytest.mark.slow
def test_a_stalled_replica_with_wait_loses_no_acknowledged_post(tmp_path, start_chattle):
    """The replica stalls (SIGSTOP) before its master dies: the posts it cannot confirm
    are refused (503), not acknowledged, and none acknowledged is missing afterwards.
    (Without --redis-wait the same run loses nothing on loopback: the kernel still takes
    the replication stream into the stopped replica's socket buffer.)"""
    report, _ledgers, _posters = failover_during_a_burst(tmp_path, start_chattle, wait_ms=1000, lagging=True)
    assert report["busiest_room_refused_before_the_kill"] > 0, report  # what the stalled replica could not confirm
    assert report["acknowledged_missing_from_history"] == 0 and report["lost"] == 0, report
    assert report["duplicated"] == 0, report


@pytest.mark.slow
def test_a_failover_without_wait_is_counted(tmp_path, start_chattle):
    """Without WAIT a post acknowledged by a master that dies before its replica had it
    can be lost; the run counts how many, and every other room goes on."""
    report, ledgers, posters = failover_during_a_burst(tmp_path, start_chattle, wait_ms=0)
    judged = sum(report[kind] for kind in ("delivered", "signalled", "lost"))
    expected = sum(1 for ledger in ledgers for _c, _i, when in posters[ledger.room].acknowledged
                   if when >= ledger.started)
    assert judged == expected  # every acknowledged post is accounted for, for every listener
    assert report["other_masters_rooms_refused"] == 0, report


def move_slot(cluster, slot, source, target):
    """Move one slot between masters as `redis-cli --cluster reshard` does: mark it
    importing and migrating, MIGRATE its keys, then give it to the target everywhere."""
    from harness.redis_cluster import command

    source_id = command(source.port, "CLUSTER", "MYID").split("\r\n")[1]
    target_id = command(target.port, "CLUSTER", "MYID").split("\r\n")[1]
    assert command(target.port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id).startswith("+OK")
    assert command(source.port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id).startswith("+OK")
    yield "migrating"
    import redis
    client = redis.Redis(port=source.port, decode_responses=True)
    try:
        for key in client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
            client.execute_command("MIGRATE", "127.0.0.1", target.port, key, 0, 5000)
        yield "asking"
        for node in [target, source] + [node for node in cluster.masters() if node not in (target, source)]:
            answer = command(node.port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
            assert answer.startswith("+OK"), answer
    finally:
        client.close()
    yield "moved"


def test_a_room_whose_slot_moves_goes_on_with_dense_ids(cluster, buses):
    """MOVED and ASK are followed: a room's slot moved to another master in the middle of its
    posts, and every post acknowledged reaches a worker that follows the room, under its id."""
    poster, follower = buses(history=100), buses(history=100)
    by_master = rooms_on_each_master(poster, 1, "moving")
    source_name, (room_name,) = sorted(by_master.items())[0]
    source = next(node for node in cluster.nodes if "127.0.0.1:%d" % node.port == source_name)
    target = next(node for node in cluster.masters() if node is not source)
    slot = poster.cluster.keyslot(poster.room_keys(room_name)[0])
    room = follower.room(room_name, 0)
    acknowledged, refused = {}, []

    def post(count):
        for _number in range(count):
            content = "%s-%d" % (room_name, len(acknowledged) + len(refused))
            try:
                acknowledged[poster.publish(room_name, "ann", content)["id"]] = content
            except chattle.BusUnavailable as exc:
                refused.append(str(exc))

    post(20)
    moving = move_slot(cluster, slot, source, target)
    assert next(moving) == "migrating"
    post(20)  # its keys are still on the source: answered there
    assert next(moving) == "asking"
    post(20)  # its keys are on the target, the slot not yet: ASK, and ASKING there
    assert next(moving) == "moved"
    post(20)  # MOVED: the poster's slot table is behind
    assert len(acknowledged) == 80, refused[:3]
    wait_until(lambda: poster._master_of(poster.room_keys(room_name)[0]).port == target.port, 20.0,
               "the poster's slot table follows the move")
    assert sorted(acknowledged) == list(range(1, len(acknowledged) + 1)) and len(acknowledged) >= 40, refused
    wait_until(lambda: room.last_id == len(acknowledged), 20.0, "every post, on the new master too")
    got = [(m["id"], m["content"]) for m in chattle.json.loads(room.answer(0, 1000))["messages"]]
    assert got == sorted(acknowledged.items())


def test_a_slot_holds_at_most_its_share_of_max_bus_rooms(cluster):
    """A script reads one slot's keys only, so on a cluster the bound on rooms is kept per slot:
    3 rooms is 1 a slot. A second room in a slot is refused, and nothing of it written; a room
    of another slot, and the first room again, are not."""
    from redis.crc import key_slot

    bus = chattle.RedisClusterBus(chattle.Rooms(10), cluster.seed, 10, max_rooms=3)
    try:
        first = "bound-first"
        names = ["bound-%d" % number for number in range(1000000)]
        second = next(name for name in names if key_slot(name.encode()) == key_slot(first.encode()))
        other = next(name for name in names if key_slot(name.encode()) != key_slot(first.encode()))
        assert bus.publish(first, "ann", "hello")["id"] == 1
        with pytest.raises(chattle.RoomsFull, match="maximum of 1 rooms"):
            bus.publish(second, "ann", "hello")
        assert bus.cluster.exists(bus.room_keys(second)[0]) == 0
        assert bus.publish(other, "ann", "hello")["id"] == 1
        assert bus.publish(first, "ann", "again")["id"] == 2
    finally:
        bus.close()
