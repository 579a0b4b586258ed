"""`make bench REDIS_CLUSTER=`: the sweep's comparison of buses (bench/buses.py).

Its arguments and what it measures are checked here; its figures come from the real run
published in docs/cluster.md. The tiny run starts a real local cluster (3 masters, 3
replicas) and a real redis-server, and parks 200 polls on each bus, on one room and spread
over a room on each master.
"""

import csv
import json
import os

import pytest

from bench import buses, sweep
from bench.rig import Rig
from harness.processes import post_json

# CLUSTER NODES as a node answers it: a replica, a master, a failed master, one not yet met
NODES = """\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@40002 master - 0 1426238316232 2 connected 5461-10922
292f 127.0.0.1:30003@40003 master,fail - 1426238316000 1426238316232 3 disconnected 10923-16383
e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
6ec2 :0@0 handshake,noaddr - 0 0 0 disconnected
"""


def test_the_comparison_has_its_own_defaults_and_flags_given_win():
    compared = sweep.parse_args(["--redis-cluster", "local"])
    assert (compared.counts, compared.workers, compared.peer_labels, compared.anatomy) == ("5000,10000", "2", [], 0)
    given = sweep.parse_args(["--redis-cluster", "127.0.0.1:7000,127.0.0.1:7001", "--counts", "200",
                              "--workers", "1,2", "--peers", "1"])
    assert (given.counts, given.workers, given.peer_labels) == (
        "200", "1,2", ["aiohttp on uvloop", "aiohttp reference", "nginx with Nchan"])
    plain = sweep.parse_args([])
    assert (plain.counts, plain.workers, plain.peer_labels, plain.anatomy) == (
        "1000,2000,5000,10000,15000", "1,2,4", ["aiohttp on uvloop", "aiohttp reference"], 2000)
    assert sweep.parse_args(["--peers", "nchan"]).peer_labels == ["nginx with Nchan"]
    assert sweep.parse_args(["--no-peers"]).peer_labels == []


@pytest.mark.parametrize("argv,said", [
    (["--redis-cluster", "127.0.0.1"], "host:port"),
    (["--redis-cluster", "127.0.0.1:7000,:7001"], "host:port"),
    (["--redis-cluster", "local", "--target", "http://127.0.0.1:8080"], "--target"),
])
def test_a_wrong_cluster_argument_is_refused_with_what_to_give(argv, said, capsys):
    with pytest.raises(SystemExit) as stopped:
        sweep.parse_args(argv)
    assert stopped.value.code == 2 and said in capsys.readouterr().err


def test_the_cluster_nodes_measured_are_the_connected_ones():
    assert buses.nodes_listed(NODES) == [("127.0.0.1", 30004), ("127.0.0.1", 30002), ("127.0.0.1", 30001)]


def test_the_rig_judges_each_poll_by_its_own_rooms_post(start_chattle):
    """Polls spread over rooms of different histories: each is woken by, and judged against,
    its room's post (judged against the first room's, the second room's would miss ids)."""
    server = start_chattle()
    for number in range(3):  # the first room is ahead of the second
        assert post_json(server.url + "/rooms/ahead/msgs", {"from": "t", "content": str(number)})[0] == 201
    point = Rig(server.url, rooms=["ahead", "behind"]).run(60, server_pids=server.worker_pids())
    assert point["client_processes"] == 2 and point["held_confirmed"] == point["delivered"] == 60
    assert point["complete_listeners"] == 60


@pytest.mark.slow
def test_a_tiny_run_measures_every_bus_with_its_redis_cpu(tmp_path, monkeypatch, cannot_run):
    from harness import system_packages
    if not system_packages.find("redis-server"):
        cannot_run(system_packages.missing_line(["redis-server"]))
    monkeypatch.setattr(sweep, "new_report_dir", lambda kind: str(tmp_path))
    assert sweep.main(["--redis-cluster", "local", "--counts", "200", "--repeats", "1"]) == 0
    with open(tmp_path / "results.json") as source:
        results = json.load(source)
    assert results["buses"] == ["1 worker, memory", "2 workers, Redis", "2 workers, Redis Cluster",
                                "2 workers, Redis, 3 rooms", "2 workers, Redis Cluster, 3 rooms"]
    assert len(results["cluster_nodes"]) == 6  # masters and replicas: every node's CPU is read
    masters = {home.split(" ")[0] for home in results["rooms_spread"].values()}
    assert len(results["rooms_spread"]) == len(masters) == 3, results["rooms_spread"]
    by_bus = {point["series"]: point for point in results["points"]}
    assert sorted(by_bus) == sorted(results["buses"])
    for label, point in by_bus.items():
        assert point["delivered"] == point["held_confirmed"] == 200, (label, point)
        assert point["complete_listeners"] == 200, label  # each poll judged by its own room's post
        assert point["server_cpu_s"] is not None and point["other_work_cores"] >= 0
        assert (point["redis_cpu_s"] is None) == (point["bus"] == buses.MEMORY), (label, point["redis_cpu_s"])
    with open(tmp_path / "results.csv", newline="") as source:
        assert sorted(row["bus"] for row in csv.DictReader(source)) == [
            "Redis", "Redis", "Redis Cluster", "Redis Cluster", "memory"]
    assert {"latency.png", "memory.png", "cpu.png", "report.html"} <= set(os.listdir(tmp_path))
