"""What a post costs on each shared bus: single Redis, Redis Cluster with --redis-wait 0
(answered once its master has it), and Redis Cluster with --redis-wait (a replica confirms
each post before its 201: the default).

For each bus, one `python chattle.py` on a fresh local Redis (harness/processes.py) or
Redis Cluster of 3 masters and 3 replicas (harness/redis_cluster.py), and one client in
this process posting `--posts` messages one after the other on one keep-alive connection,
over rooms spread on every master. Reported per bus: the post's round trip (p50, p99,
max), the posts per second one client made so, and the CPU seconds of the client beside
those of the server and its Redis nodes, all measured in the same run. The buses run in
alternation, `--rounds` times each, so a drift of the shared machine falls on all of them.

    python -m bench.cluster_posts [--posts 2000] [--rounds 3] [--wait-ms 1000]
"""

import argparse
import http.client
import json
import os
import sys
import tempfile
import time

from harness.processes import ChattleServer, RedisServer
from harness.redis_cluster import RedisCluster
from instruments.measures import latency_summary, process_cpu_seconds

ROOMS = ["r%d" % number for number in range(12)]  # over 16,384 slots: every master gets some


def post_round_trips(port, posts):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    round_trips = []
    try:
        for number in range(posts):
            body = json.dumps({"from": "bench", "content": "post %d" % number})
            started = time.perf_counter()
            connection.request("POST", "/rooms/%s/msgs" % ROOMS[number % len(ROOMS)], body=body,
                               headers={"Content-Type": "application/json"})
            answer = connection.getresponse()
            answer.read()
            round_trips.append(time.perf_counter() - started)
            if answer.status != 201:
                raise SystemExit("cluster_posts: a post was answered %d" % answer.status)
    finally:
        connection.close()
    return round_trips


def cpu(pids):
    total = 0.0
    for pid in pids:
        try:
            total += process_cpu_seconds(pid)
        except OSError:
            pass
    return total


def measure(name, env, redis_pids, posts):
    server = ChattleServer(env=env, log_path=os.path.join(tempfile.gettempdir(), "cluster-posts-%s.log" % name))
    try:
        post_round_trips(server.port, 50)  # rooms loaded, scripts cached, connections made
        before = (process_cpu_seconds(os.getpid()), cpu([server.pid]), cpu(redis_pids))
        started = time.perf_counter()
        round_trips = post_round_trips(server.port, posts)
        took = time.perf_counter() - started
        after = (process_cpu_seconds(os.getpid()), cpu([server.pid]), cpu(redis_pids))
    finally:
        server.stop()
    summary = latency_summary(round_trips)
    return {"bus": name, "posts": posts, "posts_per_s": round(posts / took, 1),
            "p50_ms": round(summary["p50"] * 1000, 2), "p99_ms": round(summary["p99"] * 1000, 2),
            "max_ms": round(summary["max"] * 1000, 2),
            "client_cpu_s": round(after[0] - before[0], 2), "server_cpu_s": round(after[1] - before[1], 2),
            "redis_cpu_s": round(after[2] - before[2], 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=2000, help="posts per bus and round (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every bus (default %(default)s)")
    parser.add_argument("--wait-ms", type=int, default=1000,
                        help="--redis-wait of the third bus (default %(default)s)")
    args = parser.parse_args(argv)
    single = RedisServer()
    cluster = None
    try:
        cluster = RedisCluster()
        node_pids = [node.pid for node in cluster.nodes]
        buses = [("redis", {"CHATTLE_REDIS_URL": single.url}, [single.pid]),
                 ("cluster-wait-0", {"CHATTLE_REDIS_CLUSTER": cluster.seed, "CHATTLE_REDIS_WAIT": "0"}, node_pids),
                 ("cluster-wait-%d" % args.wait_ms,
                  {"CHATTLE_REDIS_CLUSTER": cluster.seed, "CHATTLE_REDIS_WAIT": str(args.wait_ms)}, node_pids)]
        for round_number in range(args.rounds):
            for name, env, pids in buses:
                figures = measure(name, env, pids, args.posts)
                print(json.dumps(dict(figures, round=round_number + 1)), flush=True)
    finally:
        single.stop()
        if cluster is not None:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
