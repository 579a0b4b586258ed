"""`make load` on a Redis Cluster (loadtests/cluster_load.py): each shard's share, the
failover's count of lost, signalled and duplicated posts, the time without service.

The arithmetic is checked on made-up data; one real run (marked long) starts a local
cluster, kills the busiest room's master during the bursts and reads the report.
"""

import json
import os
import subprocess
import sys

import pytest

from harness import failover
from harness.processes import ROOT
from instruments.measures import DeliveryLedger
from loadtests import cluster_load, run

TABLE = [{"slots": [[0, 5460]], "master": "h:1", "replicas": ["h:4"]},
         {"slots": [[5461, 10922]], "master": "h:2", "replicas": ["h:5"]},
         {"slots": [[10923, 16383]], "master": "h:3", "replicas": ["h:6"]}]


# -- each shard's share ---------------------------------------------------------------------------

def test_each_shard_gets_the_posts_deliveries_and_cpu_of_its_rooms():
    slots = {"a": 10, "b": 6000, "c": 6001, "d": 5460}
    shares = cluster_load.shard_shares(TABLE, slots, {"a": 10, "b": 20, "c": 10, "d": 0},
                                       {"a": 100, "b": 200, "c": 100, "d": 0},
                                       {"h:1": 1.5, "h:4": 0.5, "h:2": 2.0, "h:5": None, "h:3": 0.1, "h:6": 0.2})
    first, second, third = shares
    assert first["rooms"] == ["a", "d"] and first["posts"] == 10 and first["deliveries"] == 100
    assert first["post_share"] == 0.25 and first["delivery_share"] == 0.25 and first["cpu_s"] == 2.0
    assert second["rooms"] == ["b", "c"] and second["posts"] == 30 and second["delivery_share"] == 0.75
    assert second["cpu_s"] == 2.0 and second["node_cpu_s"] == {"h:2": 2.0, "h:5": None}  # a node not read: not 0
    assert third["rooms"] == [] and third["posts"] == 0 and third["post_share"] == 0.0
    assert abs(third["cpu_s"] - 0.3) < 1e-9


def test_a_shard_without_rooms_is_said_in_the_report():
    shares = cluster_load.shard_shares(TABLE, {"a": 1}, {"a": 3}, {"a": 30}, {})
    rows = cluster_load.shard_lines({"cluster": {"shards": shares, "cluster_cpu_s": 0.0, "failover": None},
                                     "cpu": {}}, {})
    assert "SERVES NO ROOM" in rows[1][1] and "SERVES NO ROOM" in rows[2][1]
    assert "1 rooms (a), 3 posts (100%)" in rows[0][1]


# -- the time without service ---------------------------------------------------------------------

def test_time_without_service_runs_from_the_first_refusal_to_the_first_success_after():
    events = [(10.0, True), (11.0, False), (11.5, False), (12.0, True), (13.0, False), (14.0, True)]
    assert failover.without_service(events) == (11.0, 12.0, 1.0)
    assert failover.without_service(list(reversed(events))) == (11.0, 12.0, 1.0)  # order of arrival does not matter
    assert failover.without_service([(1.0, True), (2.0, True)]) == (None, None, 0.0)
    assert failover.without_service([(1.0, True), (2.0, False)]) == (2.0, None, None)  # never served again


def test_the_failover_service_counts_the_killed_masters_rooms_only_and_from_the_kill():
    probe = [[99.0, 503, None, None], [100.5, 503, None, None], [103.0, 201, 7, 103.0]]
    load_posts = [("r1", 5, 99.5), ("r1", 6, 104.0), ("r2", 9, 101.0)]
    errors = [[100.2, "poster", "post to r1 answered 503"], [100.1, "poster", "post to r2 answered 503"],
              [100.0, "listener", "poll: reset"]]
    # the probe's refusal at 99.0 came before the kill at 100.0; r2 is on another master
    assert cluster_load.failover_service(probe, load_posts, errors, ["r1"], 100.0) == (100.2, 103.0, 103.0 - 100.2)
    assert cluster_load.failover_service([], [("r1", 1, 101.0)], [], ["r1"], 100.0) == (None, None, 0.0)


# -- lost, signalled, duplicated --------------------------------------------------------------------

def ledger(start, ids):
    kept = DeliveryLedger(start)
    for message_id in ids:
        kept.record(message_id)
    return kept.to_dict()


def test_every_accepted_post_is_judged_for_every_listener_that_owed_it():
    accepted = [("r", 1, 1.0), ("r", 2, 2.0), ("r", 3, 3.0), ("r", 4, 4.0)]
    history = {"r": {1: 1.0, 2: 2.0, 3: 3.5, 4: 4.0}}  # id 3 now holds another post: 3.0 was lost by the cluster
    listeners = [("r", ledger(0, [1, 2, 3, 4]), 4, []),      # got id 3, but the replacement: lost, silently
                 ("r", ledger(0, [1, 2, 3, 4]), 4, [3.5]),   # the same, told afterwards: signalled
                 ("r", ledger(0, [1, 4]), 4, [2.5]),         # ids 2 and 3 skipped, told after 2's 201, before 3's
                 ("r", ledger(2, [3, 4]), 4, []),            # started after id 2: owes 3 and 4
                 ("r", ledger(0, [1, 2, 2]), 2, [])]         # stopped at 2, one duplicate
    judged = cluster_load.judge_listeners(listeners, accepted, history)
    assert judged["judged"] == 4 + 4 + 4 + 2 + 2
    assert judged["lost"] == 1 + 0 + 1 + 1 and judged["signalled"] == 1 + 1
    assert judged["delivered"] == 3 + 3 + 2 + 1 + 2
    assert judged["duplicated"] == 1 and judged["accepted_missing_from_history"] == 1
    assert judged["listeners_signalled"] == 2


def test_a_post_older_than_the_history_keeps_is_judged_by_the_ledger():
    judged = cluster_load.judge_listeners([("r", ledger(0, [1, 2]), 2, [])], [("r", 1, 1.0), ("r", 2, 2.0)],
                                          {"r": {2: 2.0}})
    assert judged["delivered"] == 2 and judged["lost"] == 0 and judged["accepted_missing_from_history"] == 0


def test_a_reset_rebases_the_ledger_on_the_servers_cursor():
    kept = DeliveryLedger(0)
    for message_id in (1, 2, 4, 5, 6):
        kept.record(message_id)
    kept.rebase(4)   # ids 5 and 6 are gone with the master; 3 is still owed
    kept.record(5)   # the new id 5, another post: not a duplicate
    assert kept.duplicated == 0 and kept.lost(5) == 1 and kept.next_expected == 6


# -- preflight ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,said", [
    (["--chaos", "failover"], "needs --redis-cluster local"),
    (["--chaos", "failover", "--redis-cluster", "127.0.0.1:1"], "needs --redis-cluster local"),
    (["--redis-wait", "100"], "give --redis-cluster too"),
    (["--redis-cluster", "local", "--redis-wait", "-1"], "0 or more"),
    (["--redis-cluster", "local", "--host", "http://127.0.0.1:1"], "--host runs no server"),
    (["--redis-cluster", "127.0.0.1:1"], "no Redis Cluster node answers at 127.0.0.1:1"),
])
def test_a_cluster_run_that_cannot_run_is_refused_with_the_reason(argv, said):
    problems = run.cluster_problems(run.parse_args(argv))
    assert any(said in problem for problem in problems), problems


# -- a real run -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.long
def test_make_load_on_a_local_cluster_with_a_failover_counts_every_loss(tmp_path, cannot_run):
    """200 listeners over 12 rooms on gunicorn x2 and a local cluster, --redis-wait 1000: the
    busiest room's master is killed during the bursts, its replica promoted, and no accepted
    post is lost or duplicated (the guarantee of --redis-wait, tests/server/test_redis_cluster.py)."""
    from harness import system_packages
    if not system_packages.find("redis-server"):
        cannot_run(system_packages.missing_line(["redis-server"]))
    done = subprocess.run([sys.executable, "-m", "loadtests.run", "--report-root", str(tmp_path),
                           "--redis-cluster", "local", "--chaos", "failover", "--redis-wait", "1000",
                           "--workers", "2", "--users", "200", "--rooms", "12", "--posters", "3",
                           "--burst-gap", "1", "--duration", "32", "--spawn-rate", "200"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    reports = [name for name in os.listdir(tmp_path) if name.endswith("-load")]
    assert len(reports) == 1, done.stdout + done.stderr
    with open(os.path.join(tmp_path, reports[0], "summary.json")) as written:
        summary = json.load(written)
    print(done.stdout[-3000:])
    shards, failed = summary["cluster"]["shards"], summary["cluster"]["failover"]
    assert len(shards) == 3 and all(shard["rooms"] for shard in shards), shards
    assert sum(len(shard["rooms"]) for shard in shards) == 12
    assert all(shard["cpu_s"] > 0 for shard in shards) and summary["cluster"]["cluster_cpu_s"] > 0
    assert failed["promoted_is_master"] and failed["killed"] != failed["promoted"], failed
    assert failed["error"] is None and failed["probe_accepted"] > 0, failed
    assert failed["judged"] > 0 and failed["lost"] == 0 and failed["duplicated"] == 0, failed
    assert failed["accepted_missing_from_history"] == 0, failed
    assert failed["without_service_s"] is not None, failed
    # the checks of a failover pass; latency and machine checks depend on the machine's load
    judged = {entry["check"]: entry for entry in summary["checks"]}
    for name in ("run completed", "the failover happened: master killed, its replica promoted",
                 "no accepted post lost silently, none duplicated", "no listener gave up",
                 "no request failed outside the failover"):
        assert judged[name]["passed"], judged[name]
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]
    assert "failover losses" in done.stdout and "shard 3" in done.stdout
