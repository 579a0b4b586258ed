"""`make load CHAOS=<fault>[,<fault>...]`: a fault injected by the harness in the middle of
the bursts, then the run ends as every run ends (each listener catches up, its ledger is
judged), and one row of figures per fault: messages lost silently, signalled, duplicated,
posts refused, the time without service, a verdict. `CHAOS=all` (or several faults) runs
the matrix: each fault its own short run (fresh server and Redis) and one table (docs/faults.md).

The harness injects every fault from outside the product, by pid, signal, a Redis command
or the wire; the product never imports this module (tests/test_architecture.py).
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse

from chattle_limits import client_timeout
from harness.processes import ROOT, CleanUp, RedisServer, get_json, wait_until
from instruments.judging import first_served, judge_run

INJECT_INTO_BURSTS = 0.25  # the fault strikes this far into the bursts stage (a fraction of it)
PROBE_INTERVAL = 0.2       # seconds between the probe's posts to room 0, from the injection on
PROBE_AFTER = 8.0          # seconds the probe goes on after the harness's part of the fault ended
RESTORE_BOUND = 20.0       # seconds after the harness's part ended by which service must be back
VANISH_RELEASE_BOUND = 1.5  # seconds within which /stats must show the vanished clients' polls gone
SLOW_READERS = 50          # connections that send polls and never read
SLOW_READER_POLLS = 200    # polls each sends, pipelined
SLOW_READER_SECONDS = 10.0  # how long they stay
SLOW_READER_RSS_BOUND = 64 * 1024 * 1024  # the server's RSS may grow at most this much meanwhile
EVICT_BYTES = 200_000      # room-evict: the server's CHATTLE_MAX_RETAINED_BYTES
EVICT_ROOMS = 40           # ... and rooms flooded to push the load's rooms out
EVICT_POSTS = 5            # ... posts of EVICT_CONTENT characters to each
EVICT_CONTENT = 1800
EVICT_POLLS = 4            # ... and polls of each flooded room, so every worker loads it
ROOM_TTL = 3               # room-expire: the server's CHATTLE_ROOM_TTL (seconds)
WORKER_BACK_WHILE_DOWN = 5.0  # worker-kill-redis-down: seconds Redis stays down at most for the new worker
TRIM_WAIT = 2.0            # reader-trimmed: seconds of posts while one worker is stopped, before the trim


class Fault:
    """One fault: what it needs, how the run's processes start for it, how it strikes.
    `needs`: "any" (any server), "redis" (gunicorn on a local redis-server), "cluster"
    (REDIS_CLUSTER=local)."""

    name = None
    needs = "redis"
    what = ""
    redis_appendonly = True
    server_env = {}

    def inject(self, ctx, record):
        """Strike; return when the harness's part is over (a paused process resumed, a
        stopped one started again). Records what it did in `record`."""
        raise NotImplementedError

    def cleanup(self, ctx):
        """Undo what a failed or interrupted injection may have left (a stopped process)."""


class RedisRestart(Fault):
    name = "redis-restart"
    redis_appendonly = False
    what = "redis-server SIGKILLed and started again on its port, without persistence: every history gone"

    def inject(self, ctx, record):
        ctx.restart_redis(signal.SIGKILL, appendonly=False, record=record)


class RedisRestartAof(Fault):
    name = "redis-restart-aof"
    what = "redis-server stopped (SIGTERM: the AOF is written) and started again from its AOF: histories kept"

    def inject(self, ctx, record):
        ctx.restart_redis(signal.SIGTERM, appendonly=True, record=record)


class RedisPause(Fault):
    name = "redis-pause"
    what = "redis-server SIGSTOPped for longer than the client timeouts, then SIGCONT"

    def inject(self, ctx, record):
        pause = client_timeout(ctx.poll_timeout) + 2.0
        record.update(paused_pid=ctx.redis.pid, pause_s=pause)
        ctx.redis.signal(signal.SIGSTOP)
        record["struck_at"] = time.time()
        try:
            ctx.halt.wait(pause)
        finally:
            ctx.redis.signal(signal.SIGCONT)

    def cleanup(self, ctx):
        if ctx.redis is not None:
            ctx.redis.signal(signal.SIGCONT)


class WorkerSignalled(Fault):
    """One gunicorn worker sent `stop_signal`; the fault lasts until the master has forked
    its replacement."""
    stop_signal, recorded_as = None, None

    def inject(self, ctx, record):
        pid = ctx.server.worker_pids()[0]
        record[self.recorded_as] = pid
        os.kill(pid, self.stop_signal)
        record["struck_at"] = time.time()
        ctx.wait_for_workers(record, gone=pid)


class WorkerKill(WorkerSignalled):
    name = "worker-kill"
    what = "one gunicorn worker SIGKILLed (its master forks another)"
    stop_signal, recorded_as = signal.SIGKILL, "killed_pid"


class WorkerRecycle(WorkerSignalled):
    name = "worker-recycle"
    what = ("one gunicorn worker sent SIGTERM: it stops accepting, ends its requests within gunicorn's "
            "graceful timeout and exits; the master forks another (what max_requests does, at a chosen moment)")
    stop_signal, recorded_as = signal.SIGTERM, "terminated_pid"


class WorkerKillRedisDown(Fault):
    name = "worker-kill-redis-down"
    what = "redis-server stopped (SIGTERM, AOF kept), a gunicorn worker SIGKILLed, redis-server started again"

    def inject(self, ctx, record):
        def kill_one():
            pid = ctx.server.worker_pids()[0]
            record.update(killed_pid=pid)
            os.kill(pid, signal.SIGKILL)
            # the master forks another at once; whether it boots without Redis is the server's
            ctx.wait_for_workers(record, gone=pid, timeout=WORKER_BACK_WHILE_DOWN)
        ctx.restart_redis(signal.SIGTERM, appendonly=True, record=record, while_down=kill_one)


class RoomEvict(Fault):
    name = "room-evict"
    needs = "any"
    server_env = {"CHATTLE_MAX_RETAINED_BYTES": str(EVICT_BYTES)}
    what = ("the server runs with CHATTLE_MAX_RETAINED_BYTES=%d; %d other rooms are flooded (%d posts of %d "
            "characters each, then polled) so the byte bound evicts rooms" % (EVICT_BYTES, EVICT_ROOMS, EVICT_POSTS,
                                                                EVICT_CONTENT))

    def inject(self, ctx, record):
        accepted = refused = 0
        for number in range(EVICT_ROOMS * EVICT_POSTS):
            if ctx.halt.is_set():
                break
            status, _body = ctx.post("evict-%d" % (number % EVICT_ROOMS), "x" * EVICT_CONTENT, "chaos-flood")
            accepted += status == 201
            refused += status != 201
        # On the shared bus a worker holds a copy only of the rooms polled there: poll each
        # flooded room on fresh connections (which reach every worker in turn), so the copies
        # outgrow the bound.
        for number in range(EVICT_ROOMS * EVICT_POLLS):
            if ctx.halt.is_set():
                break
            get_json("%s/rooms/evict-%d/msgs?since=0&timeout=0" % (ctx.url, number % EVICT_ROOMS), timeout=5)
        record.update(flood_accepted=accepted, flood_refused=refused, rooms_forgotten=ctx.rooms_forgotten())


class RoomExpire(Fault):
    name = "room-expire"
    server_env = {"CHATTLE_ROOM_TTL": str(ROOM_TTL)}
    probe_from_start = False
    what = ("the server runs with CHATTLE_ROOM_TTL=%d s: rooms quiet that long expire in Redis while clients "
            "hold polls on them (the probe is quiet for the TTL and a second, then posts)" % ROOM_TTL)

    def inject(self, ctx, record):
        record["struck_at"] = time.time() + ROOM_TTL    # the probe's room expires then, unless a burst came
        ctx.halt.wait(ROOM_TTL + 1.0)


class ReaderTrimmed(Fault):
    name = "reader-trimmed"
    what = ("one gunicorn worker SIGSTOPped; while others take posts, XTRIM chattle:posts MAXLEN 0 trims the "
            "global stream past its reader's position; then SIGCONT")

    def inject(self, ctx, record):
        pid = ctx.server.worker_pids()[0]
        record.update(stopped_pid=pid)
        os.kill(pid, signal.SIGSTOP)
        record["struck_at"] = time.time()
        try:
            ctx.halt.wait(TRIM_WAIT)
            record["trimmed"] = ctx.redis_command("XTRIM", "chattle:posts", "MAXLEN", "0")
            ctx.halt.wait(1.0)
        finally:
            os.kill(pid, signal.SIGCONT)
        self._pid = pid

    def cleanup(self, ctx):
        pid = getattr(self, "_pid", None)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


class VanishedClients(Fault):
    name = "vanished-clients"
    needs = "any"
    what = ("one listener in 5 resets its held poll's connection without a FIN (SO_LINGER 0) and leaves; "
            "/stats waiters must drop by as many within %g s, and the rest lose nothing" % VANISH_RELEASE_BOUND)

    def inject(self, ctx, record):
        # Held polls dip for a moment in every fan-out (answered, not yet polled again): the
        # highest of a few readings is the count held, before and after.
        before = ctx.settled_waiters()
        if before is None:
            raise RuntimeError("/stats did not reach every worker")
        record["waiters_before"] = before
        pids = ctx.load_worker_pids()
        record["load_processes"] = len(pids)
        for pid in pids:
            os.kill(pid, signal.SIGUSR2)
        record["struck_at"] = time.time()
        vanished_file = os.path.join(ctx.raw_dir, "vanished")

        def lines():
            if not os.path.exists(vanished_file):
                return []
            with open(vanished_file) as told:
                return [line.split() for line in told if line.strip()]
        wait_until(lambda: len(lines()) >= len(pids), 10, "every load process's vanished listeners")
        told = lines()
        vanished = sum(int(count) for _pid, count, _when in told)
        vanished_at = max(float(when) for _pid, _count, when in told)
        record.update(vanished=vanished, vanished_at=vanished_at)
        target = before - vanished
        released_at, seen = None, None
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not ctx.halt.is_set():
            seen = ctx.settled_waiters(readings=3)
            # a small allowance: listeners between an answer and their next poll
            if seen is not None and seen <= target + max(2, 0.02 * before):
                released_at = time.time()
                break
            time.sleep(0.05)
        record.update(waiters_after=seen, released_after_s=None if released_at is None
                      else released_at - vanished_at)


class SlowReaders(Fault):
    name = "slow-readers"
    needs = "any"
    what = ("%d connections each send %d polls (since=0, limit=1000) with a small receive buffer and never read "
            "for %g s; the server's RSS may grow at most %d MiB meanwhile, and the rest lose nothing"
            % (SLOW_READERS, SLOW_READER_POLLS, SLOW_READER_SECONDS, SLOW_READER_RSS_BOUND // 2 ** 20))

    def inject(self, ctx, record):
        import psutil

        def rss():
            total = 0
            for pid in ctx.server.worker_pids():
                try:
                    total += psutil.Process(pid).memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            return total
        before = peak = rss()
        host, port = urllib.parse.urlsplit(ctx.url).hostname, urllib.parse.urlsplit(ctx.url).port
        request = ("GET /rooms/%s/msgs?since=0&timeout=0&limit=1000 HTTP/1.1\r\nHost: %s:%d\r\n\r\n"
                   % (ctx.rooms[0], host, port)).encode() * SLOW_READER_POLLS
        sockets = []
        try:
            for _ in range(SLOW_READERS):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
                sock.settimeout(5)
                sock.connect((host, port))
                sock.setblocking(False)
                try:
                    sock.send(request)
                except BlockingIOError:
                    pass
                sockets.append(sock)
            deadline = time.monotonic() + SLOW_READER_SECONDS
            while time.monotonic() < deadline and not ctx.halt.is_set():
                peak = max(peak, rss())
                time.sleep(0.5)
        finally:
            for sock in sockets:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
        record.update(slow_readers=len(sockets), rss_before=before, rss_peak=peak, rss_growth=peak - before)


class ClusterFailover(Fault):
    name = "cluster-failover"
    needs = "cluster"
    what = ("the master of room load-0 in a local Redis Cluster SIGKILLed, its replica promoted, the old "
            "master started again as a replica (loadtests/cluster_load.py, default settings)")


FAULTS = {fault.name: fault for fault in (RedisRestart(), RedisRestartAof(), RedisPause(), WorkerKill(),
                                          WorkerRecycle(), WorkerKillRedisDown(), RoomEvict(), RoomExpire(),
                                          ReaderTrimmed(), VanishedClients(), SlowReaders(), ClusterFailover())}
ALL = tuple(FAULTS)
ALIASES = {"failover": "cluster-failover"}


def parse_chaos(text):
    """[fault names] of a CHAOS= value ("all", or names separated by commas); ValueError
    naming the unknown ones."""
    names = [ALIASES.get(name.strip(), name.strip()) for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(ALL)
    unknown = [name for name in names if name not in FAULTS]
    if unknown:
        raise ValueError("unknown fault %s: give all, or some of %s" % (", ".join(unknown), ", ".join(ALL)))
    return names


def fault_problem(fault, args):
    """Why `fault` cannot run with these settings (None: it can)."""
    if fault.needs == "cluster" and args.redis_cluster != "local":
        return "%s needs REDIS_CLUSTER=local (a cluster this run starts)" % fault.name
    if fault.needs == "redis" and (args.workers < 2 or args.redis_cluster):
        return "%s needs WORKERS=2 or more on a local redis-server (not REDIS_CLUSTER)" % fault.name
    if fault.needs == "any" and args.redis_cluster:
        return "%s runs without REDIS_CLUSTER" % fault.name
    if args.host:
        return "%s strikes the run's own processes: not with HOST=" % fault.name
    if args.remote_workers:
        return "%s needs the load processes on this host (no REMOTE_WORKERS)" % fault.name
    return None


# -- during the run ---------------------------------------------------------------------------------

class FaultContext:
    """What a fault may touch: the run's redis-server (replaced when restarted: `redis`
    is always the live one, which the run stops at its end), its server, its load processes."""

    def __init__(self, redis, server, url, raw_dir, rooms, poll_timeout, locust_pid):
        self.redis, self.server, self.url, self.raw_dir = redis, server, url, raw_dir
        self.rooms, self.poll_timeout, self.locust_pid = rooms, poll_timeout, locust_pid
        self.halt = threading.Event()

    def restart_redis(self, stop_signal, appendonly, record, while_down=None):
        old = self.redis
        record.update(redis_pid=old.pid)
        old.signal(stop_signal)
        old.popen.wait(30)
        old.stop()  # reaped: closes its log
        record["redis_down_at"] = record["struck_at"] = time.time()
        if while_down is not None:
            while_down()
        self.redis = RedisServer(workdir=old.workdir, port=old.port, appendonly=appendonly, own_session=True)
        record.update(redis_up_at=time.time(), redis_new_pid=self.redis.pid)

    def redis_command(self, *words):
        import redis
        client = redis.Redis(host=self.redis.bind, port=self.redis.port, socket_timeout=5, decode_responses=True)
        try:
            return client.execute_command(*words)
        finally:
            client.close()

    def wait_for_workers(self, record, gone, timeout=30.0):
        """Until gunicorn has as many workers as it started with again, `gone` not among them (bounded)."""
        def back():
            pids = self.server.worker_pids()
            return len(pids) >= self.server.workers and gone not in pids
        try:
            wait_until(back, timeout, "gunicorn's workers back")
            record["workers_back_at"] = time.time()
        except RuntimeError as exc:
            record["workers_back_at"] = None
            record["note"] = str(exc).splitlines()[0]

    def post(self, room, content, sender):
        from loadtests.cluster_load import probe_post
        return probe_post(self.url, room, content, sender)

    def stats_by_worker(self):
        """{pid: /stats body} of the workers a few /stats requests reached (each request
        reaches one worker: a few per worker)."""
        seen = {}
        for _ in range(4 * max(1, self.server.workers if self.server.gunicorn else 1)):
            try:
                status, body = get_json(self.url + "/stats", timeout=2)
            except OSError:
                continue
            if status == 200 and isinstance(body, dict):
                seen[body["pid"]] = body
        return seen

    def waiters(self, since=None):
        """Polls held now, summed over the workers /stats reached; with `since`, None until
        every worker answered after it."""
        seen = self.stats_by_worker()
        if since is not None and len(seen) < len(self.server.worker_pids()):
            return None
        return sum(body["waiters"] for body in seen.values())

    def rooms_forgotten(self):
        """Rooms the workers forgot at their bounds (/stats rooms_forgotten), summed over
        the workers /stats reached; None when none did."""
        seen = self.stats_by_worker()
        return sum(body.get("rooms_forgotten", 0) for body in seen.values()) if seen else None

    def settled_waiters(self, readings=5, gap=0.05):
        """The highest of `readings` waiters() sums `gap` apart that reached every worker (None: none did)."""
        seen = []
        for _ in range(readings * 3):
            value = self.waiters(since=0)
            if value is not None:
                seen.append(value)
                if len(seen) == readings:
                    break
            time.sleep(gap)
        return max(seen) if seen else None

    def load_worker_pids(self):
        import psutil
        try:
            return [child.pid for child in psutil.Process(self.locust_pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


class ChaosThread(threading.Thread):
    """Waits for the bursts, then injects `fault` (INJECT_INTO_BURSTS into the stage); a
    probe posts to room 0 every PROBE_INTERVAL from the injection (or from the end of the
    harness's part, for faults that need quiet) until PROBE_AFTER after that part ended."""

    def __init__(self, fault, ctx, stages, shape_started):
        super().__init__(daemon=True)
        self.fault, self.ctx, self.stages, self.shape_started = fault, ctx, stages, shape_started
        self.record = {"fault": fault.name, "what": fault.what}
        self.probe_posts = []      # [room, id, ts, epoch] of each accepted probe post
        self.probe_refusals = []   # [when, room, status, outcome unknown]
        self.error = None
        self._probe_done = threading.Event()

    def stop(self):
        self.ctx.halt.set()
        self.join(120)
        try:
            self.fault.cleanup(self.ctx)
        except Exception:  # noqa: BLE001  (best effort: the run stops its processes anyway)
            pass

    def run(self):
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001  (the row says so; the run goes on)
            self.error = "%s: %s" % (type(exc).__name__, exc)
            self.fault.cleanup(self.ctx)
        finally:
            self._probe_done.set()

    def _probe(self):
        from loadtests.cluster_load import probe_post
        number = 0
        room = self.ctx.rooms[0]
        while not self._probe_done.is_set():
            number += 1
            status, body = probe_post(self.ctx.url, room, "probe %d" % number)
            if status == 201 and isinstance(body, dict):
                self.probe_posts.append([room, body["id"], body["ts"], body.get("epoch")])
            else:
                unknown = status == 503 and isinstance(body, dict) and body.get("outcome") == "unknown"
                self.probe_refusals.append([time.time(), room, status, unknown])
            self._probe_done.wait(PROBE_INTERVAL)

    def _run(self):
        bursts = next(stage for stage in self.stages if stage["name"] == "bursts")
        at = bursts["start"] + INJECT_INTO_BURSTS * (bursts["end"] - bursts["start"])
        while not self.ctx.halt.is_set():
            started = self.shape_started()
            if started is not None and time.time() >= started + at:
                break
            self.ctx.halt.wait(0.1)
        if self.ctx.halt.is_set():
            return
        probe = threading.Thread(target=self._probe, daemon=True)
        if getattr(self.fault, "probe_from_start", True):
            probe.start()
        self.record["injected_at"] = time.time()
        try:
            self.fault.inject(self.ctx, self.record)
        finally:
            self.record["harness_done_at"] = time.time()
            if not probe.is_alive():
                probe.start()
            self.ctx.halt.wait(PROBE_AFTER)
            self._probe_done.set()
            probe.join(10)


# -- the row -------------------------------------------------------------------------------------------

def chaos_row(fault_name, record, tally, extra_posts=(), extra_refusals=()):
    """One fault's figures and verdict from the run's tally (listeners with receipts, accepted
    posts, refusals) and the fault's record: the table's row (docs/faults.md)."""
    listeners = tally.listeners if tally is not None else []
    posts = [list(post) + [None] * (4 - len(post)) for post in (tally.posts if tally is not None else [])]
    posts += [list(post) for post in extra_posts]
    judged = judge_run(listeners, posts)
    totals = judged["totals"]
    refusals = list(tally.refusals if tally is not None else []) + [list(entry) for entry in extra_refusals]
    injected = record.get("injected_at")
    window = [entry for entry in refusals if injected is None or entry[0] >= injected - 1.0]
    refused = sum(1 for _when, _room, status, unknown in refusals if status is not None and not unknown)
    unknown = sum(1 for _when, _room, status, unknown in refusals if unknown)
    no_answer = sum(1 for _when, _room, status, _unknown in refusals if status is None)
    # the first post the listeners got after the fault took hold (a post accepted in the
    # moment a fault takes to act is not service restored), timed from the injection
    struck = record.get("struck_at") or injected
    served = first_served(posts, listeners, struck) if injected is not None else None
    without = None if served is None or injected is None else max(0.0, served - injected)
    done = record.get("harness_done_at") or injected
    restored = served is not None and done is not None and served <= done + RESTORE_BOUND
    reasons = []
    if record.get("error"):
        reasons.append("the fault was not injected: %s" % record["error"])
    if injected is None:
        reasons.append("the fault was never injected")
    if totals["lost"]:
        reasons.append("%d lost silently" % totals["lost"])
    if totals["duplicated"]:
        reasons.append("%d duplicated" % totals["duplicated"])
    if injected is not None and not restored:
        reasons.append("service not restored within %g s of the fault's end" % RESTORE_BOUND)
    if totals["listeners"] == 0:
        reasons.append("no listener was judged")
    if fault_name == "vanished-clients" and injected is not None:
        after = record.get("released_after_s")
        if after is None or after > VANISH_RELEASE_BOUND:
            reasons.append("/stats waiters did not drop by the %s vanished within %g s (%s)" % (
                record.get("vanished"), VANISH_RELEASE_BOUND, "never" if after is None else "%.2f s" % after))
    if fault_name == "room-evict" and injected is not None and not record.get("rooms_forgotten"):
        reasons.append("the byte bound forgot no room (/stats rooms_forgotten %s): the fault did not happen"
                       % record.get("rooms_forgotten"))
    if fault_name == "slow-readers" and injected is not None and record.get("rss_growth") is not None \
            and record["rss_growth"] > SLOW_READER_RSS_BOUND:
        reasons.append("server RSS grew %.1f MiB under slow readers (bound %d MiB)" % (
            record["rss_growth"] / 2 ** 20, SLOW_READER_RSS_BOUND // 2 ** 20))
    vanished = sum(1 for listener in listeners if listener.get("vanished"))
    return {"fault": fault_name, "lost_silently": totals["lost"], "signalled": totals["signalled"],
            "duplicated": totals["duplicated"], "delivered": totals["delivered"], "owed": totals["owed"],
            "out_of_order": totals["out_of_order"], "listeners": totals["listeners"],
            "listeners_losing": totals["listeners_losing"], "listeners_signalled": totals["listeners_signalled"],
            "vanished_listeners": vanished, "histories": totals["histories"],
            "refused": refused, "outcome_unknown": unknown, "no_answer": no_answer,
            "refused_in_window": len(window), "posts": len(posts),
            "time_without_service_s": without, "first_served_at": served, "restored": restored,
            "passed": not reasons, "verdict": "passed" if not reasons else "FAILED: " + "; ".join(reasons),
            "record": record,
            "per_listener": [entry for entry in judged["listeners"]
                             if entry["lost"] or entry["signalled"] or entry["duplicated"]][:200]}


def row_line(row):
    """The row as text, in the table's columns."""
    return "%-24s %8s %9s %10s %18s %10s  %s" % (
        row["fault"], row["lost_silently"], row["signalled"], row["duplicated"], refused_text(row),
        "never" if row["time_without_service_s"] is None else "%.1f s" % row["time_without_service_s"],
        row["verdict"])


def refused_text(row):
    return "%d (%d unknown)" % (row["refused"] + row["no_answer"], row["outcome_unknown"])


TABLE_HEAD = "%-24s %8s %9s %10s %18s %10s  %s" % ("fault", "lost", "signalled", "duplicated", "refused",
                                                     "no service", "verdict")


def table_lines(rows):
    return [TABLE_HEAD] + [row_line(row) for row in rows]


def table_html(rows):
    import html
    head = "".join("<th>%s</th>" % name for name in ("fault", "lost silently", "signalled", "duplicated",
                                                     "refused (outcome unknown)", "time without service",
                                                     "verdict"))
    body = []
    for row in rows:
        cells = [row["fault"], row["lost_silently"], row["signalled"], row["duplicated"], refused_text(row),
                 "never" if row["time_without_service_s"] is None else "%.1f s" % row["time_without_service_s"],
                 row["verdict"]]
        body.append("<tr class=\"%s\">%s</tr>" % ("" if row["passed"] else "fail", "".join(
            "<td>%s</td>" % html.escape(str(cell)) for cell in cells)))
    return "<table class=\"chaos\"><tr>%s</tr>%s</table>" % (head, "".join(body))


# -- CHAOS=all: the matrix ----------------------------------------------------------------------------

def strip_chaos(argv):
    """argv without --chaos (and its value) and --report-root (and its value)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--chaos", "--report-root", "--redis-cluster"):
            skip = True
            continue
        if arg.startswith(("--chaos=", "--report-root=", "--redis-cluster=")):
            continue
        out.append(arg)
    return out


def run_matrix(names, argv, report_root, new_report_dir):
    """Each fault its own run (`python -m loadtests.run --chaos <fault>`, fresh server and
    Redis), one after another, then one table: reports/<ts>-chaos/ (summary.txt, index.html,
    chaos.json). Exit status 0 when every row passed, 1 otherwise, 130 on Ctrl-C."""
    report_dir = new_report_dir("chaos", root=report_root)
    runs_root = os.path.join(report_dir, "runs")
    os.makedirs(runs_root)
    print("load: CHAOS matrix of %d faults, report in %s" % (len(names), report_dir), flush=True)
    base = strip_chaos(argv)
    rows, started = [], time.time()

    CleanUp.arm()  # a SIGTERM takes Ctrl-C's way: the running fault's run ends cleanly, once
    interrupted = False
    for name in names:
        fault = FAULTS[name]
        run_argv = [sys.executable, "-m", "loadtests.run", *base, "--chaos", name, "--report-root", runs_root]
        if fault.needs == "cluster":
            run_argv += ["--redis-cluster", "local"]
        print("load: CHAOS=%s: %s" % (name, " ".join(run_argv[1:])), flush=True)
        began = time.time()
        # its own session: a Ctrl-C reaches this process only, which passes it on once
        child = subprocess.Popen(run_argv, cwd=ROOT, start_new_session=True)
        try:
            code = child.wait()
        except KeyboardInterrupt:
            interrupted = True
            child.send_signal(signal.SIGINT)   # it stops what it started and writes its report
            try:
                code = child.wait(180)
            except subprocess.TimeoutExpired:
                child.kill()
                code = child.wait()
        row = read_row(runs_root, child.pid, name, code)
        row["run_seconds"] = time.time() - began
        rows.append(row)
        print("load: CHAOS=%s: %s" % (name, row["verdict"]), flush=True)
        if interrupted:
            break
    from instruments.history import git_state
    from instruments.page import machine_line
    from instruments.provenance import cpu_model, provenance
    matrix = {"faults": names, "rows": rows, "started": started, "seconds": time.time() - started,
              "argv": base, "passed": all(row["passed"] for row in rows) and len(rows) == len(names),
              "git": git_state(), "machine": "%s, %s" % (cpu_model(), machine_line()),
              "provenance": provenance(started=started)}
    with open(os.path.join(report_dir, "chaos.json"), "w") as out:
        json.dump(matrix, out, indent=1)
    lines = table_lines(rows) + ["", "%d faults in %.0f s: %s" % (len(rows), matrix["seconds"],
                                                                  "PASSED" if matrix["passed"] else "FAILED")]
    with open(os.path.join(report_dir, "summary.txt"), "w") as out:
        out.write("\n".join(lines) + "\n")
    with open(os.path.join(report_dir, "index.html"), "w") as out:
        out.write("<!doctype html><meta charset=utf-8><title>Chattle CHAOS matrix</title><style>"
                  "td,th{padding:2px 8px;text-align:left} tr.fail td{color:#b00}</style>"
                  "<h1>Chattle CHAOS matrix: %s</h1>%s<p>Each row's own report: %s</p>"
                  % ("passed" if matrix["passed"] else "FAILED", table_html(rows),
                     " ".join("<a href=\"runs/%s/report.html\">%s</a>" % (os.path.basename(row["report_dir"]),
                                                                         row["fault"])
                              for row in rows if row.get("report_dir"))))
    print("\nChattle CHAOS matrix: %s" % ("PASSED" if matrix["passed"] else "FAILED"))
    for line in lines:
        print("  " + line)
    print("report: %s" % os.path.join(report_dir, "index.html"))
    if interrupted:
        return 130
    return 0 if matrix["passed"] else 1


def read_row(runs_root, _pid, name, code):
    """The row a run wrote in its summary.json (its newest report under `runs_root`)."""
    dirs = sorted((entry for entry in os.listdir(runs_root) if entry.endswith("-load")),
                  key=lambda entry: os.path.getmtime(os.path.join(runs_root, entry)))
    for entry in reversed(dirs):
        path = os.path.join(runs_root, entry, "summary.json")
        if not os.path.exists(path):
            continue
        with open(path) as raw:
            summary = json.load(raw)
        row = summary.get("chaos")
        if row and row.get("fault") == name:
            row = dict(row, report_dir=os.path.join(runs_root, entry), exit_code=code)
            if not summary.get("passed") and row["passed"]:
                failed = [check["check"] for check in summary["checks"] if not check["passed"]]
                row.update(passed=False, verdict="FAILED: " + "; ".join(failed))
            return row
    return {"fault": name, "lost_silently": None, "signalled": None, "duplicated": None, "refused": 0,
            "no_answer": 0, "outcome_unknown": 0, "time_without_service_s": None, "passed": False,
            "verdict": "FAILED: the run wrote no row (exit %s)" % code, "report_dir": None, "exit_code": code}
