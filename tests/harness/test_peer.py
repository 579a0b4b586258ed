"""The aiohttp reference server of `make bench` speaks the protocol subset the rig uses.

If it drifted (a different answer shape, a poll that never wakes), the Chattle / aiohttp
ratios in every bench report would quietly compare different things.
"""

import gevent
import pytest

from bench.rig import Rig
from bench.sweep import PEERS
from harness.processes import PeerServer, get_json, post_json, wait_until
from instruments.measures import time_per_waiter


@pytest.fixture(scope="module", params=sorted(PEERS.items()), ids=sorted(PEERS))
def peer(request, tmp_path_factory):
    label, args = request.param
    server = PeerServer(log_path=str(tmp_path_factory.mktemp("peer") / "peer.log"), args=args)
    yield server
    server.stop()


def post(peer, room, content):
    return post_json("%s/rooms/%s/msgs" % (peer.url, room), {"from": "ann", "content": content})


def poll(peer, room, query, timeout=10):
    return get_json("%s/rooms/%s/msgs?%s" % (peer.url, room, query), timeout=timeout)


def test_health_and_stats_name_the_process(peer):
    status, health = get_json(peer.url + "/health")
    assert status == 200 and health["pid"] == peer.pid
    status, stats = get_json(peer.url + "/stats")
    assert status == 200 and stats["pid"] == peer.pid
    assert stats["waiters"] == 0 and stats["rss_bytes"] > 0


def test_posts_get_dense_ids_and_the_newest_sets_the_cursor(peer):
    assert [post(peer, "dense", "m%d" % i)[1]["id"] for i in (1, 2, 3)] == [1, 2, 3]
    status, body = post(peer, "dense", "m4")
    assert status == 201 and body["room"] == "dense" and isinstance(body["ts"], float)
    status, body = poll(peer, "dense", "limit=1")
    assert status == 200 and body["cursor"] == 4 and [m["content"] for m in body["messages"]] == ["m4"]


def test_a_held_poll_wakes_on_a_post(peer):
    post(peer, "wake", "before")
    held = gevent.spawn(poll, peer, "wake", "since=1&timeout=30", 40)
    wait_until(lambda: get_json(peer.url + "/stats")[1]["waiters"] == 1, 20, "the poll is held")
    status, posted = post(peer, "wake", "news")
    status, body = held.get(timeout=30)
    assert status == 200
    assert body == {"room": "wake", "cursor": 2, "missed": 0,
                    "messages": [{"id": 2, "from": "ann", "content": "news", "ts": posted["ts"]}]}


def test_a_timeout_answers_nothing_with_the_same_cursor(peer):
    post(peer, "quiet", "one")
    status, body = poll(peer, "quiet", "since=1&timeout=0.2")
    assert status == 200 and body == {"room": "quiet", "messages": [], "cursor": 1, "missed": 0}


def test_a_cursor_from_the_future_is_reset_at_once(peer):
    post(peer, "future", "only")
    status, body = poll(peer, "future", "since=99&timeout=30")
    assert status == 200 and body["reset"] is True and body["cursor"] == 1
    assert [m["id"] for m in body["messages"]] == [1]


def test_the_uvloop_peer_runs_on_uvloop(tmp_path):
    """--uvloop must really change the loop, or the second reference measures the first again."""
    server = PeerServer(log_path=str(tmp_path / "peer.log"), args=PEERS["aiohttp on uvloop"])
    try:
        assert get_json(server.url + "/stats")[1]["loop"].startswith("uvloop")
    finally:
        server.stop()


def test_the_bench_rig_measures_it(peer):
    point = Rig(peer.url, room="rig").run(50, server_pids=peer.worker_pids())
    assert point["held_confirmed"] == 50 and point["delivered"] == 50 and point["complete_listeners"] == 50
    assert time_per_waiter(point["last_delivery_s"], point["delivered"]) > 0
