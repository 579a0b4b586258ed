"""`make load` on a Redis Cluster: the cluster (started for the run, or given), each
shard's share of the rooms, posts, deliveries and CPU, and `CHAOS=failover`: the master of
the busiest room killed during the bursts, every accepted post judged for every listener.

The cluster is asked through its own commands (harness/failover.py), never through the
server: the product's internals may change, its wire contract and /stats do not.
"""

import threading
import time

from harness import failover
from harness.processes import get_json, post_json

LOCAL = "local"
CHAOS_KINDS = ("failover",)
KILL_INTO_BURSTS = 0.25     # the master dies this far into the bursts stage (a fraction of it)
PROBE_INTERVAL = 0.2        # seconds between the probe's posts around the failover
PROBE_LEAD = 1.0            # seconds the probe posts before the kill: the room served, then not
PROBE_TAIL = 1.0            # seconds it goes on after the room is served again
SERVED_AGAIN_DEADLINE = 90.0
HISTORY_PAGE = 1000


def cluster_nodes(address):
    """host:port of every node the cluster knows and does not hold failed."""
    nodes = []
    for line in failover.ask(address, "CLUSTER", "NODES").splitlines():
        fields = line.split()
        if len(fields) > 2 and "fail" not in fields[2].split(",") and "noaddr" not in fields[2]:
            nodes.append(fields[1].split("@")[0])
    return sorted(nodes)


class ClusterForLoad:
    """The run's cluster: `local` starts 3 masters and 3 replicas (harness/redis_cluster.py)
    in `workdir`, stopped by pid in stop(); host:port[,...] uses a running one."""

    def __init__(self, spec, workdir):
        self.local = None
        if spec == LOCAL:
            from harness.redis_cluster import RedisCluster
            self.local = RedisCluster(workdir=workdir)
            self.addresses = self.local.addresses
        else:
            self.addresses = spec
        self.seed = self.addresses.split(",")[0].strip()
        self.nodes = cluster_nodes(self.seed)
        self.table = failover.slot_table(self.seed)
        self.cpu_start = {node: failover.node_cpu_seconds(node) for node in self.nodes}
        self.cpu_carried = {}    # a node killed: what it had used since the start, before it died

    def pids(self):
        return {"127.0.0.1:%d" % node.port: node.pid for node in self.local.nodes} if self.local else {}

    def room_slots(self, rooms):
        return {room: failover.room_slot(self.seed, room) for room in rooms}

    def master_of(self, room):
        """The harness's node serving `room` now (local clusters only)."""
        address = failover.shard_of_slot(failover.slot_table(self.seed), failover.room_slot(self.seed, room))["master"]
        return next(node for node in self.local.nodes if "127.0.0.1:%d" % node.port == address)

    def before_kill(self, address):
        self.cpu_carried[address] = failover.node_cpu_seconds(address) - self.cpu_start.get(address, 0.0)
        self.cpu_start[address] = 0.0   # the node started again begins from nothing

    def cpu_used(self):
        """CPU seconds each node used during the run (INFO cpu), a killed one's life before and after."""
        used = {}
        for node in self.nodes:
            try:
                now = failover.node_cpu_seconds(node)
            except Exception:  # noqa: BLE001  (a node down at the end: what it had before)
                now = None
            used[node] = (self.cpu_carried.get(node, 0.0) + now - self.cpu_start.get(node, 0.0)
                          if now is not None else self.cpu_carried.get(node))
        return used

    def stop(self):
        if self.local is not None:
            self.local.stop()


# -- the failover during the bursts ---------------------------------------------------------------

def probe_post(url, room, content, sender="chaos-probe"):
    """(status, body) of one post of a fault's probe; (None, why) when no answer came: a
    probe counts those, it does not stop at one."""
    try:
        return post_json("%s/rooms/%s/msgs" % (url, room), {"from": sender, "content": content})
    except (OSError, ValueError) as exc:
        return None, str(exc)


class FailoverChaos(threading.Thread):
    """Waits for the bursts, then SIGKILLs the master of `room` (by pid), waits for its
    replica's promotion and starts the old master again as its replica. A probe posts to
    `room` every PROBE_INTERVAL from PROBE_LEAD before the kill until PROBE_TAIL after the
    room is served again: the time without service does not wait for a poster's next burst."""

    def __init__(self, cluster, server_url, room, stages, shape_started):
        super().__init__(daemon=True)
        self.cluster, self.url, self.room = cluster, server_url, room
        self.stages, self.shape_started = stages, shape_started
        self.halt = threading.Event()
        self.probe_posts = []    # [wall time of the answer, status, id, ts]
        self.record = {"room": room}
        self.error = None

    def stop(self):
        self.halt.set()
        self.join(SERVED_AGAIN_DEADLINE + failover.PROMOTION_DEADLINE)

    def _probe(self, until):
        number = 0
        while not until.is_set() and not self.halt.is_set():
            number += 1
            status, body = probe_post(self.url, self.room, "probe %d" % number)
            accepted = status == 201 and isinstance(body, dict)
            self.probe_posts.append([time.time(), status, body["id"] if accepted else None,
                                     body["ts"] if accepted else None])
            until.wait(PROBE_INTERVAL)

    def run(self):
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001  (the report says it; the run goes on)
            self.error = "%s: %s" % (type(exc).__name__, exc)

    def _run(self):
        bursts = next(stage for stage in self.stages if stage["name"] == "bursts")
        kill_at_stage = bursts["start"] + KILL_INTO_BURSTS * (bursts["end"] - bursts["start"])
        while not self.halt.is_set():
            started = self.shape_started()
            if started is not None and time.time() >= started + kill_at_stage - PROBE_LEAD:
                break
            self.halt.wait(0.2)
        if self.halt.is_set():
            return
        doomed = self.cluster.master_of(self.room)
        address = "127.0.0.1:%d" % doomed.port
        self.record.update(killed=address, killed_pid=doomed.pid)
        probe_done = threading.Event()
        probe = threading.Thread(target=self._probe, args=(probe_done,), daemon=True)
        probe.start()
        try:
            self.halt.wait(PROBE_LEAD)
            self.cluster.before_kill(address)
            wall_minus_monotonic = time.time() - time.monotonic()
            done = failover.fail_over(self.cluster.local, doomed)
            self.record.update(killed_at=done["killed_at"] + wall_minus_monotonic,
                               promoted_at=done["promoted_at"] + wall_minus_monotonic,
                               promoted="127.0.0.1:%d" % done["heir"].port,
                               promoted_is_master=done["heir"].role() == "master",
                               restarted_pid=done["restarted"].pid if done["restarted"] else None)
            deadline = time.monotonic() + SERVED_AGAIN_DEADLINE
            while time.monotonic() < deadline and not self.halt.is_set():
                if any(when > self.record["killed_at"] and status == 201 for when, status, _i, _t in self.probe_posts):
                    break
                self.halt.wait(PROBE_INTERVAL)
            self.halt.wait(PROBE_TAIL)
        finally:
            probe_done.set()
            probe.join(10)


def room_history(url, room, last):
    """{id: ts} of every message the room's history holds now, page by page."""
    held, cursor = {}, 0
    for _page in range(last // HISTORY_PAGE + 2):
        status, body = get_json("%s/rooms/%s/msgs?since=%d&timeout=0&limit=%d" % (url, room, cursor, HISTORY_PAGE), 10)
        if status != 200:
            raise RuntimeError("the history of %s: answered %s %s" % (room, status, body))
        held.update((message["id"], message["ts"]) for message in body["messages"])
        if body["cursor"] <= cursor or body["cursor"] >= last:
            break
        cursor = body["cursor"]
    return held


# -- the figures (plain data in, plain data out: tests/harness/test_load_on_redis_cluster.py) -------------------

def shard_shares(table, room_slots, posts_by_room, deliveries_by_room, node_cpu):
    """Per shard of `table` (failover.slot_table at the start): its rooms, their posts and
    deliveries with their share of the run's, and the CPU of its nodes (master and replicas)."""
    all_posts = sum(posts_by_room.values()) or 1
    all_deliveries = sum(deliveries_by_room.values()) or 1
    shares = []
    for shard in table:
        rooms = sorted((room for room, slot in room_slots.items()
                        if any(first <= slot <= last for first, last in shard["slots"])),
                       key=lambda name: (len(name), name))
        posts = sum(posts_by_room.get(room, 0) for room in rooms)
        deliveries = sum(deliveries_by_room.get(room, 0) for room in rooms)
        nodes = [shard["master"]] + shard["replicas"]
        cpu = {node: node_cpu.get(node) for node in nodes}
        shares.append({"slots": shard["slots"], "master": shard["master"], "replicas": shard["replicas"],
                       "rooms": rooms, "posts": posts, "post_share": posts / all_posts,
                       "deliveries": deliveries, "delivery_share": deliveries / all_deliveries,
                       "node_cpu_s": cpu,
                       "cpu_s": sum(value for value in cpu.values() if value is not None)})
    return shares


def judge_listeners(listeners, accepted, histories):
    """Every accepted post of a room, for every listener that owed it: delivered, signalled
    (not delivered, the listener told `reset` or `missed` after the post's 201) or lost.

    `listeners`: [(room, ledger dict, the last id it owed, [when it was told])];
    `accepted`: [(room, id, ts)] of every 201; `histories`: {room: {id: ts}} after the run.
    A post whose id the room's history holds under another ts was lost by the cluster
    (its id went to a later post): not delivered, whatever the ledger says of its id.
    A post older than what the history still retains is judged by the ledger alone."""
    totals = {"judged": 0, "delivered": 0, "signalled": 0, "lost": 0, "duplicated": 0, "out_of_order": 0,
              "listeners_signalled": 0, "accepted_missing_from_history": 0}
    by_room, kept = {}, {}
    for room, message_id, ts in accepted:
        by_room.setdefault(room, []).append((message_id, ts))
        history = histories.get(room, {})
        oldest = min(history, default=message_id + 1)
        kept[room, message_id, ts] = message_id < oldest or abs(history.get(message_id, float("nan")) - ts) <= 1e-6
    totals["accepted_missing_from_history"] = sum(1 for held in kept.values() if not held)
    for room, ledger, owed_until, signals in listeners:
        gaps = set(ledger["gaps"])

        def delivered(post, room=room, ledger=ledger, gaps=gaps):
            message_id, ts = post
            return kept[room, message_id, ts] and ledger["start"] < message_id < ledger["next_expected"] \
                and message_id not in gaps
        owed = [((message_id, ts), ts) for message_id, ts in by_room.get(room, [])
                if ledger["start"] < message_id <= owed_until]
        got, told, lost = failover.judge(owed, delivered, signals)
        totals["judged"] += len(owed)
        totals["delivered"] += got
        totals["signalled"] += told
        totals["lost"] += lost
        totals["duplicated"] += ledger["duplicated"]
        totals["out_of_order"] += ledger["out_of_order"]
        totals["listeners_signalled"] += bool(signals)
    return totals


def failover_service(probe_posts, load_posts, load_errors, rooms, killed_at):
    """(first refusal, first 201 after it, seconds without service) of the killed master's
    `rooms`, from the probe's posts and the load's own: its accepted posts (ts) and its
    refused ones (poster errors naming the room), from the kill on."""
    events = [(when, status == 201) for when, status, _id, _ts in probe_posts]
    events += [(ts, True) for room, _id, ts, *_epoch in load_posts if room in rooms]
    events += [(when, False) for when, who, what in load_errors
               if who == "poster" and any(("post to %s " % room) in what for room in rooms)]
    return failover.without_service([(when, served) for when, served in events if when >= killed_at])


# -- the report's part ----------------------------------------------------------------------------

FAILOVER_ERROR_MARGIN = 5.0   # seconds after the room is served again that its errors still belong to the failover


def cluster_summary(cluster, tally, final_ids, histories):
    """{"shards": [...], "failover": {...} or None} of a run on a cluster: `cluster` is what
    run.py's cluster_figures wrote, `tally` the run's RunTally, `histories` {room: {id: ts}}."""
    entries = tally.ledgers() if tally is not None else []
    posts = [tuple(post[:3]) for post in (tally.posts if tally is not None else [])]
    failed = cluster.get("failover")
    probe_accepted = [(failed["room"], message_id, ts) for _when, status, message_id, ts in
                      (failed or {}).get("probe_posts", []) if status == 201]
    posts_by_room, deliveries_by_room = {}, {}
    for room, _id, _ts in posts + probe_accepted:
        posts_by_room[room] = posts_by_room.get(room, 0) + 1
    for entry, ledger in entries:
        if ledger is not None:
            deliveries_by_room[entry["room"]] = deliveries_by_room.get(entry["room"], 0) + ledger.received
    shards = shard_shares(cluster["table"], cluster["room_slots"], posts_by_room, deliveries_by_room,
                          cluster["node_cpu_s"])
    summary = {"shards": shards, "cluster_cpu_s": sum(shard["cpu_s"] for shard in shards), "failover": None}
    if failed is None:
        return summary
    listeners = []
    for entry, ledger in entries:
        if ledger is None or entry["gave_up"]:
            continue
        last = final_ids.get(entry["room"], ledger.next_expected - 1)
        until = entry.get("listened_until")
        listeners.append((entry["room"], ledger.to_dict(), last if until is None else min(last, until),
                          entry.get("signals") or []))
    held = {room: {int(key): ts for key, ts in history.items()} for room, history in histories.items()}
    judged = judge_listeners(listeners, posts + probe_accepted, held)
    killed_shard = next((shard for shard in shards if shard["master"] == failed.get("killed")), None)
    rooms = killed_shard["rooms"] if killed_shard else [failed["room"]]
    first_refused, served_again, seconds = failover_service(
        failed.get("probe_posts", []), posts, tally.errors if tally is not None else [], rooms,
        failed.get("killed_at") or 0)
    summary["failover"] = dict(judged, room=failed["room"], killed=failed.get("killed"),
                               killed_pid=failed.get("killed_pid"), promoted=failed.get("promoted"),
                               killed_at=failed.get("killed_at"), promoted_at=failed.get("promoted_at"),
                               promoted_is_master=bool(failed.get("promoted_is_master")),
                               promoted_after_s=failed["promoted_at"] - failed["killed_at"]
                               if failed.get("promoted_at") and failed.get("killed_at") else None,
                               rooms_of_killed_master=rooms, first_refused=first_refused, served_again=served_again,
                               without_service_s=seconds, probe_posts=len(failed.get("probe_posts", [])),
                               probe_accepted=len(probe_accepted), error=failed.get("error"))
    return summary


def failover_errors(failed, errors):
    """(within, outside): the run's kept errors inside the failover's window (from the kill
    to FAILOVER_ERROR_MARGIN after the room was served again, or promoted) and outside it."""
    start = failed.get("killed_at") or float("inf")
    end = (failed.get("served_again") or failed.get("promoted_at") or start) + FAILOVER_ERROR_MARGIN
    within = [error for error in errors if start <= error[0] <= end]
    return within, [error for error in errors if not start <= error[0] <= end]


def shard_lines(summary, run):
    """(name, value, "") rows of the report: each shard's share, the failover's count."""
    rows = []
    cpu = summary.get("cpu") or {}
    cluster = summary.get("cluster") or {}
    for number, shard in enumerate(cluster.get("shards", []), 1):
        slots = ",".join("%d-%d" % (first, last) for first, last in shard["slots"])
        if shard["rooms"]:
            served = "%d rooms (%s), %d posts (%.0f%%), %d deliveries (%.0f%%)" % (
                len(shard["rooms"]), " ".join(shard["rooms"]), shard["posts"], 100 * shard["post_share"],
                shard["deliveries"], 100 * shard["delivery_share"])
        else:
            served = "SERVES NO ROOM (more rooms spread over every shard: ROOMS>=10)"
        node_cpu = ", ".join("%s %s s" % (node, "-" if value is None else "%.1f" % value)
                             for node, value in shard["node_cpu_s"].items())
        rows.append(("shard %d" % number, "slots %s, master %s: %s; CPU %.1f s (%s)"
                     % (slots, shard["master"], served, shard["cpu_s"], node_cpu), ""))
    if cluster.get("shards"):
        rows.append(("CPU: client / server / redis", "%s s / %s s / %.1f s (the %d nodes, INFO cpu)"
                     % (_seconds(cpu.get("client_cpu_s")), _seconds(cpu.get("server_cpu_s")),
                        cluster["cluster_cpu_s"], sum(len(shard["node_cpu_s"]) for shard in cluster["shards"])), ""))
    post = ((summary.get("locust") or {}).get("by_name") or {}).get("POST post")
    if cluster.get("shards") and post:
        wait = (run.get("cluster") or {}).get("redis_wait_ms")
        rows.append(("post latency", "p50 %s ms, p99 %s ms over %d posts (Locust), --redis-wait %s"
                     % (post["median_ms"], post["p99_ms"], post["requests"],
                        "the server's default" if wait is None else wait), ""))
    failed = cluster.get("failover")
    if failed:
        rows.append(("failover", "killed %s (pid %s, master of %s), %s promoted %s%s" % (
            failed["killed"], failed["killed_pid"], failed["room"], failed["promoted"],
            "-" if failed["promoted_after_s"] is None else "after %.1f s" % failed["promoted_after_s"],
            "" if failed["promoted_is_master"] else " (NOT promoted)"), ""))
        rows.append(("failover losses", "%(lost)d lost, %(signalled)d signalled, %(duplicated)d duplicated, "
                     "%(delivered)d delivered of %(judged)d owed deliveries; %(accepted_missing_from_history)d "
                     "accepted posts missing from their room's history; %(listeners_signalled)d listeners told "
                     "reset or missed" % failed, ""))
        rows.append(("without service", "-" if failed["first_refused"] is None else
                     "%s s: the killed master's rooms (%s), first refused post to the first accepted after "
                     "(probe: %d posts, %d accepted)" % (
                         "never served again" if failed["without_service_s"] is None
                         else "%.2f" % failed["without_service_s"], " ".join(failed["rooms_of_killed_master"]),
                         failed["probe_posts"], failed["probe_accepted"]), ""))
    return rows


def _seconds(value):
    return "-" if value is None else "%.1f" % value
