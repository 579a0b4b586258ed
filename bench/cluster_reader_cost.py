"""What a worker's readers cost on Redis Cluster while posts go to rooms it does not hold.

Two `python chattle.py` on one local Redis Cluster (3 masters, 3 replicas,
harness/redis_cluster.py): the listening worker holds a long-poll on one room; the
posting worker takes `--posts` posts to that room and, in the busy case,
`--others-per-post` more before each of them, spread over `--other-rooms` other rooms;
each post of that room is delivered before the next is made (one poll answer per post).
Reported per case: the listening worker's wake-ups (instruments/measures.py) and CPU
seconds over the posts, and its CPU beyond what it spends idle with the poll held
(measured over a few seconds before; the busy case takes longer); what its readers were
given (its /stats, where the revision counts it); the messages its poll delivered; beside
them the CPU of the client (this process) and of the posting worker, in the same run.
Cases and revisions run in alternation, `--rounds` times each, so a drift of a shared
machine falls on all of them.

    python -m bench.cluster_reader_cost [--posts 300] [--other-rooms 50] [--others-per-post 10]
                                        [--rounds 2] [--base CHECKOUT]

`--base`: another checkout (e.g. `git archive main | tar -x -C /tmp/base`) whose chattle.py
runs the same cases beside this one's.
"""

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time

from harness.processes import ROOT, ChattleServer, get_json, wait_until
from harness.redis_cluster import RedisCluster
from instruments.measures import process_cpu_seconds, process_wakeups

HELD = "held"
IDLE_SECONDS = 4.0


class Poster:
    def __init__(self, port):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, room, content):
        self.connection.request("POST", "/rooms/%s/msgs" % room, body=json.dumps({"from": "bench", "content": content}),
                                headers={"Content-Type": "application/json"})
        answer = self.connection.getresponse()
        body = json.loads(answer.read())
        if answer.status != 201:
            raise SystemExit("cluster_reader_cost: a post was answered %d: %s" % (answer.status, body))
        return body["id"]

    def close(self):
        self.connection.close()


class Listener(threading.Thread):
    """One client holding a long-poll on the held room, following its cursor."""

    def __init__(self, port, cursor):
        super().__init__(daemon=True)
        self.port, self.cursor, self.delivered, self.polls, self.stopping = port, cursor, 0, 0, False
        self.moved = threading.Condition()

    def wait_for(self, cursor, timeout=30):
        with self.moved:
            if not self.moved.wait_for(lambda: self.cursor >= cursor, timeout):
                raise SystemExit("cluster_reader_cost: post %d not delivered in %d s" % (cursor, timeout))

    def run(self):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            while not self.stopping:
                connection.request("GET", "/rooms/%s/msgs?since=%d&timeout=2&limit=1000" % (HELD, self.cursor))
                body = json.loads(connection.getresponse().read())
                self.polls += 1
                self.delivered += len(body["messages"])
                with self.moved:
                    self.cursor = body["cursor"]
                    self.moved.notify_all()
        finally:
            connection.close()


def measure(revision, root, cluster, posts, other_rooms, others_per_post):
    env = {"CHATTLE_REDIS_CLUSTER": cluster.seed}
    logs = tempfile.gettempdir()
    listening = ChattleServer(env=env, root=root, log_path=os.path.join(logs, "reader-cost-listening.log"))
    posting = ChattleServer(env=env, root=root, log_path=os.path.join(logs, "reader-cost-posting.log"))
    poster = Poster(posting.port)
    try:
        start = poster.post(HELD, "warm-up")  # the room exists, the scripts are cached
        listener = Listener(listening.port, start)
        listener.start()
        wait_until(lambda: get_json(listening.url + "/stats")[1]["waiters"] == 1, 30, "the poll held")
        others = ["other-%d" % number for number in range(other_rooms)]
        # what the worker spends with a poll held and nothing posted (its topology watch,
        # the poll's renewals), so that a longer run is not mistaken for a dearer one
        idle_from = process_cpu_seconds(listening.pid)
        time.sleep(IDLE_SECONDS)
        idle_per_s = (process_cpu_seconds(listening.pid) - idle_from) / IDLE_SECONDS
        started = time.monotonic()
        before = (process_cpu_seconds(listening.pid), process_cpu_seconds(posting.pid),
                  process_cpu_seconds(os.getpid()), process_wakeups(listening.pid))
        for number in range(posts):
            for step in range(others_per_post if others else 0):
                poster.post(others[(number * others_per_post + step) % len(others)], "elsewhere")
            # one poll answer per post of the held room, in both cases alike
            listener.wait_for(poster.post(HELD, "post %d" % number))
        seconds = time.monotonic() - started
        after = (process_cpu_seconds(listening.pid), process_cpu_seconds(posting.pid),
                 process_cpu_seconds(os.getpid()), process_wakeups(listening.pid))
        stats = get_json(listening.url + "/stats")[1]
        listener.stopping = True
    finally:
        poster.close()
        listening.stop()
        posting.stop()
    listener.join(10)
    return {"revision": revision, "other_rooms": other_rooms, "held_room_posts": posts,
            "other_rooms_posts": posts * others_per_post if other_rooms else 0,
            "seconds": round(seconds, 2), "listening_worker_cpu_s": round(after[0] - before[0], 2),
            "listening_worker_cpu_s_beyond_idle": round(after[0] - before[0] - idle_per_s * seconds, 2),
            "listening_worker_wakeups": after[3] - before[3],
            "received": stats.get("bus_posts_received"),
            "received_for_rooms_not_held": stats.get("bus_posts_received_for_rooms_not_held"),
            "delivered": listener.delivered, "polls": listener.polls,
            "posting_worker_cpu_s": round(after[1] - before[1], 2), "client_cpu_s": round(after[2] - before[2], 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=300, help="posts to the held room per case (default %(default)s)")
    parser.add_argument("--other-rooms", type=int, default=50, help="rooms of the busy case (default %(default)s)")
    parser.add_argument("--others-per-post", type=int, default=10,
                        help="posts to other rooms before each post to the held room, busy case (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every case (default %(default)s)")
    parser.add_argument("--base", help="another checkout to run beside this one")
    args = parser.parse_args(argv)
    revisions = [("head", ROOT)] + ([("base", os.path.abspath(args.base))] if args.base else [])
    cluster = RedisCluster()
    try:
        for round_number in range(args.rounds):
            for revision, root in revisions:
                for other_rooms in (0, args.other_rooms):
                    figures = measure(revision, root, cluster, args.posts, other_rooms, args.others_per_post)
                    print(json.dumps(dict(figures, round=round_number + 1)), flush=True)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    started = time.time()
    code = main()
    print("cluster_reader_cost: %.0f s" % (time.time() - started), file=sys.stderr)
    sys.exit(code)
