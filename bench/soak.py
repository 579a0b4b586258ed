"""`make soak`: a steady load with churn for a long while, every process's memory,
descriptors, greenlets and rooms sampled, and each judged by the slope of its line.

    python -m bench.soak [--duration 2h] [--quick] [--workers 2] [--trace]

One server (`python chattle.py` on the memory bus, or gunicorn with --workers on a
redis-server it starts), one load process (bench/soak_driver.py: listeners that come and
go, rooms left to expire, steady posts, polls that time out, keep-alive connections that
close, hostile clients). Every --sample-every seconds (10) it reads, for each server
worker, the gunicorn master, the redis-server and the load process: RSS and descriptors
from /proc, and the worker's open connections, held polls, rooms and answer cache from
its /stats (the load process writes its own).

The verdicts, per figure, on the steady part (after --warm-up):
- memory (RSS, the answer cache): a least-squares line; fails when the upper end of its
  95 % confidence interval exceeds --rss-gate bytes per held connection per hour;
- exact counts (descriptors beyond open connections, greenlets beyond clients: each read
  in one step of the process it counts): fails when the upper end of the line's rise over
  the steady part exceeds COUNT_TOLERANCE units (docs/soak.md says why two);
- counts that move with churn (open connections, rooms above the live ones): fails when
  the lower end of the rise exceeds COUNT_TOLERANCE, i.e. growth beyond doubt;
- then, the load gone: within the idle timeouts every descriptor and connection count
  returns to its idle value exactly, and RSS to within 10 % of it.
Exit 0 when all pass, 1 when a gate fails, 2 when the run could not be made.
"""

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from harness.processes import ROOT, ChattleServer, RedisServer, get_json
from instruments import page
from instruments.provenance import bench_environment, provenance

SAMPLE_EVERY = 10.0
QUICK_DURATION = 300.0
QUICK_WARM_UP = 90.0
WARM_UP_MAX = 1200.0             # the workers' RSS settled for about 20 minutes (docs/soak.md)
RSS_GATE = 1024                  # bytes per held connection per hour
COUNT_TOLERANCE = 2.0            # units of rise over the steady part (docs/soak.md)
IDLE_RETURN = 0.10               # RSS back within this share of idle
CONFIDENCE_Z = 1.96
# The server's settings for the soak: a bound on retained history small enough to be
# reached in the warm-up, so rooms left behind are shed by it (the memory bus keeps a
# room's history until this bound needs the room), and a short TTL so the shared bus's
# copies of left rooms expire within the run.
SOAK_SERVER_ENV = {"CHATTLE_MAX_RETAINED_BYTES": str(64 * 1024), "CHATTLE_ROOM_TTL": "120",
                   # a room's history fills in 100 posts to it (at 500, a long-lived room of
                   # the soak took over a quarter of an hour, past the warm-up)
                   "CHATTLE_HISTORY": "50"}
# The shared bus's stream of recent posts (chattle.RedisBus.POSTS) keeps about its last
# 10 000 entries: at 10 posts a second it would fill for 17 minutes, past the warm-up. It
# starts full instead, as on a bus that has run for a while; the first post trims it.
BUS_STREAM = "chattle:posts"
BUS_PREFILL = 12000
QUICK_RSS_GATE = 16 * 1024       # what 3.5 minutes of samples resolve (docs/soak.md)
TRACE_VARIABLE = "CHATTLE_BENCH_TRACE"


def seconds(text):
    """'2h', '90m', '300s', '300' -> seconds."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([hms]?)\s*", str(text))
    if not match:
        raise argparse.ArgumentTypeError("a duration is a number with h, m or s: %r" % text)
    return float(match.group(1)) * {"h": 3600, "m": 60, "s": 1, "": 1}[match.group(2)]


# -- the line ------------------------------------------------------------------------------

def t_quantile(df):
    """Student's t at 97.5 % for `df` degrees of freedom (Cornish-Fisher, within 0.5 %
    of the table from 3 up; no scipy in the harness)."""
    if df <= 0:
        return float("inf")
    z = CONFIDENCE_Z
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def fit_line(points):
    """Least squares over [(t seconds, value)]: slope per second, intercept, the slope's
    95 % half-width, n."""
    n = len(points)
    if n < 3:
        return None
    mean_t = sum(t for t, _v in points) / n
    mean_v = sum(v for _t, v in points) / n
    sxx = sum((t - mean_t) ** 2 for t, _v in points)
    if sxx <= 0:
        return None
    slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / sxx
    intercept = mean_v - slope * mean_t
    residual = sum((v - intercept - slope * t) ** 2 for t, v in points)
    se = math.sqrt(residual / (n - 2) / sxx)
    return {"slope": slope, "intercept": intercept, "half_width": t_quantile(n - 2) * se, "n": n}


# -- what each figure is and how it is judged -------------------------------------------------

MEMORY, EXACT, CHURNING, SHOWN = "memory", "exact count", "count with churn", "shown"


def judge(name, kind, points, span, held, rss_gate=RSS_GATE):
    """The verdict of one figure over the steady part."""
    line = fit_line(points)
    verdict = {"figure": name, "kind": kind, "n": len(points)}
    if line is None:
        verdict.update(passed=kind == SHOWN, why="too few samples to fit a line")
        return verdict
    per_hour = line["slope"] * 3600
    half = line["half_width"] * 3600
    verdict.update(line, per_hour=per_hour, per_hour_low=per_hour - half, per_hour_high=per_hour + half,
                   rise=line["slope"] * span, rise_low=(line["slope"] - line["half_width"]) * span,
                   rise_high=(line["slope"] + line["half_width"]) * span)
    if kind == MEMORY:
        gate = rss_gate * held
        verdict.update(per_connection_hour=per_hour / held, per_connection_hour_high=(per_hour + half) / held,
                       gate_per_hour=gate, passed=per_hour + half <= gate,
                       why="upper bound %s/h against a gate of %s/h (%d B per held connection per hour)"
                           % (size(per_hour + half), size(gate), rss_gate))
    elif kind == EXACT:
        verdict.update(passed=verdict["rise_high"] <= COUNT_TOLERANCE,
                       why="rise over the steady part at most %.2f (tolerance %g)"
                           % (verdict["rise_high"], COUNT_TOLERANCE))
    elif kind == CHURNING:
        verdict.update(passed=verdict["rise_low"] <= COUNT_TOLERANCE,
                       why="rise over the steady part at least %.2f (fails above %g)"
                           % (verdict["rise_low"], COUNT_TOLERANCE))
    else:
        verdict.update(passed=True, why="shown, not judged")
    return verdict


def size(value):
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return "%s%.1f %s" % (sign, value, unit)
        value /= 1024


# -- sampling ---------------------------------------------------------------------------------

def proc_rss(pid):
    """Resident bytes; None for a process gone (an exiting one reads 0)."""
    try:
        with open("/proc/%d/statm" % pid) as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") or None
    except OSError:
        return None


def proc_descriptors(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def tcp_peers(pid, port):
    """Established TCP connections of `pid` with `port` at either end: a worker's connections
    to the shared bus (its pool of up to 64 opens as concurrency needs and then stays), or
    the redis-server's clients."""
    import psutil
    try:
        return sum(1 for conn in psutil.Process(pid).net_connections(kind="tcp")
                   if conn.status == psutil.CONN_ESTABLISHED
                   and port in (conn.laddr.port if conn.laddr else None, conn.raddr.port if conn.raddr else None))
    except psutil.Error:
        return None


def worker_stats(url, pids, probes=60):
    """{pid: /stats} of every worker: each probe reaches whichever worker accepts it."""
    seen = {}
    for _ in range(probes):
        status, body = get_json(url + "/stats", timeout=10)
        if status == 200 and isinstance(body, dict):
            seen[body["pid"]] = body
        if set(pids) <= set(seen):
            break
    return seen


class Sampler:
    """One row per sample: {figure name: value}, named by role ("worker 1", "redis" ...)."""

    def __init__(self, server, redis, status_path, samples_path=None):
        self.server, self.redis, self.status_path = server, redis, status_path
        self.samples_path = samples_path  # each row is appended as it is taken: a cut run keeps them
        self.workers = sorted(server.worker_pids())
        self.rows = []
        self.kinds = {}
        self.started = time.monotonic()

    def figure(self, row, name, kind, value):
        if value is not None:
            row[name] = value
            self.kinds[name] = kind

    def driver_status(self):
        try:
            with open(self.status_path) as status:
                return json.load(status)
        except (OSError, ValueError):
            return None

    def sample(self, phase, driver_pid=None):
        row = {"t": time.monotonic() - self.started, "time": time.time(), "phase": phase}
        driver = self.driver_status() if phase in ("warm-up", "load") else None
        live_rooms = driver["live_rooms"] if driver else 0
        stats = worker_stats(self.server.url, self.workers)
        for number, pid in enumerate(self.workers, 1):
            role = "worker %d" % number
            body = stats.get(pid)
            self.figure(row, role + " rss", MEMORY, proc_rss(pid))
            if body is None:
                continue
            if body.get("descriptors") is None:  # it could not list them: out of descriptors
                row.setdefault("unreadable", []).append(role + " descriptors")
                continue
            beyond = body["descriptors"] - body["connections"]
            if self.redis is not None:
                bus = tcp_peers(pid, self.redis.port)  # read just after: the pool changes seldom
                beyond = None if bus is None else beyond - bus
                self.figure(row, role + " bus connections", SHOWN, bus)
            self.figure(row, role + " descriptors beyond connections", EXACT, beyond)
            self.figure(row, role + " connections", CHURNING, body["connections"])
            self.figure(row, role + " rooms above live", CHURNING, body["rooms"] - live_rooms)
            self.figure(row, role + " answer cache bytes", MEMORY, body["answer_cache_bytes"])
            self.figure(row, role + " held polls", SHOWN, body["waiters"])
            self.figure(row, role + " retained bytes", SHOWN, body["retained_bytes"])
        if self.server.gunicorn:
            self.figure(row, "master rss", MEMORY, proc_rss(self.server.pid))
            self.figure(row, "master descriptors", EXACT, proc_descriptors(self.server.pid))
        if self.redis is not None:
            self.figure(row, "redis rss", MEMORY, proc_rss(self.redis.pid))
            clients = tcp_peers(self.redis.pid, self.redis.port)
            descriptors = proc_descriptors(self.redis.pid)
            self.figure(row, "redis descriptors beyond clients", EXACT,
                        None if clients is None else descriptors - clients)
            self.figure(row, "redis clients", SHOWN, clients)
        if driver and driver.get("stopping"):
            driver = None  # its load is over: its own figures are no longer the steady part's
        if driver_pid is not None and driver:
            self.figure(row, "load rss", MEMORY, proc_rss(driver_pid))
        if driver:
            self.figure(row, "load descriptors beyond sockets", EXACT, driver["descriptors_beyond_sockets"])
            self.figure(row, "load greenlets beyond clients", EXACT, driver["greenlets_beyond_clients"])
            self.figure(row, "load sockets", SHOWN, driver["sockets"])
            row["driver"] = driver
        self.rows.append(row)
        if self.samples_path:
            with open(self.samples_path, "a") as out:
                out.write(json.dumps(row, default=str) + "\n")
        return row


# -- tracemalloc, on request ---------------------------------------------------------------------

def trace_snapshot(pids, trace_dir, label):
    """Ask each traced worker for a snapshot (harness/bench_server.py dumps one on SIGUSR2)."""
    with open(os.path.join(trace_dir, "label"), "w") as out:
        out.write(label)
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 60
    wanted = [os.path.join(trace_dir, "%d-%s.snapshot" % (pid, label)) for pid in pids]
    while time.monotonic() < deadline and not all(os.path.exists(p) for p in wanted):
        time.sleep(0.5)


def growing_sites(trace_dir, pid, top=15):
    import tracemalloc
    try:
        before = tracemalloc.Snapshot.load(os.path.join(trace_dir, "%d-steady.snapshot" % pid))
        after = tracemalloc.Snapshot.load(os.path.join(trace_dir, "%d-end.snapshot" % pid))
    except OSError:
        return []
    return [str(stat) for stat in after.compare_to(before, "lineno")[:top]]


# -- the run ------------------------------------------------------------------------------------

def run(args):
    report_dir = args.out or page.new_report_dir("soak")
    os.makedirs(report_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="chattle-soak-")
    status_path = os.path.join(scratch, "driver.json")
    env = dict(SOAK_SERVER_ENV)
    trace_dir = None
    if args.trace:
        trace_dir = os.path.join(scratch, "trace")
        os.makedirs(trace_dir)
        env[TRACE_VARIABLE] = trace_dir
    redis = server = driver = None
    run_provenance = provenance()  # the tree as it starts: a long run outlives a commit
    started_at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    commit = git_commit()  # the tree that runs, not the one a long run ends on
    try:
        if args.workers > 1:
            redis = RedisServer()
            prefill_bus_stream(redis.url)
        server = ChattleServer(workers=args.workers, redis_url=redis.url if redis else None, env=env,
                               log_path=os.path.join(report_dir, "server.log"))
        sampler = Sampler(server, redis, status_path, os.path.join(report_dir, "samples.jsonl"))
        print("soak: %s, %s on %s; load for %gs, warm-up %gs, a sample every %gs; report in %s"
              % ("gunicorn x%d on redis" % args.workers if server.gunicorn else "python chattle.py (memory bus)",
                 "faults %s" % fault_note() if server.faulted else "clean", server.url, args.duration,
                 args.warm_up, args.sample_every, report_dir), flush=True)
        cold = sampler.sample("cold")
        # The idle a server returns to is that of a server that has held the load once:
        # CPython keeps the memory of its high-water mark. So a short load first, and the
        # idle figures after it.
        # The same rooms as the load after it: rooms the priming left behind would be shed
        # during the load and hide a growth of rooms.
        prime = start_driver(args, server, args.prime, os.path.join(scratch, "prime.json"), seed=1,
                             log_path=os.path.join(report_dir, "driver-prime.log"))
        prime.wait(args.prime + 120)
        wait_for_counts(sampler, cold, args.idle_wait)
        for _ in range(3):
            sampler.sample("idle")
            time.sleep(1.0)
        idle = dict(sampler.rows[-1])
        driver = start_driver(args, server, args.duration, status_path, seed=1,
                              log_path=os.path.join(report_dir, "driver.log"))
        load_started = time.monotonic()
        steady_from = load_started + args.warm_up
        traced_steady = False
        next_sample = load_started
        while driver.poll() is None:
            time.sleep(max(0.0, next_sample - time.monotonic()))
            next_sample += args.sample_every
            if driver.poll() is not None:
                break
            phase = "load" if time.monotonic() >= steady_from else "warm-up"
            row = sampler.sample("load" if phase == "load" else "warm-up", driver.pid)
            row["steady"] = phase == "load"
            if trace_dir and phase == "load" and not traced_steady:
                trace_snapshot(sampler.workers, trace_dir, "steady")
                traced_steady = True
            if args.verbose:
                print("soak: %6.0fs %s" % (row["t"], brief(row)), flush=True)
            if time.monotonic() > load_started + args.duration + 120:
                break
        if trace_dir:
            trace_snapshot(sampler.workers, trace_dir, "end")
        driver.wait(60)
        final = sampler.driver_status() or {}
        returned = return_to_idle(sampler, idle, args.idle_wait)
        verdicts = judge_all(sampler, args)
        result = {
            "started": started_at, "command": " ".join(sys.argv), "commit": commit,
            "provenance": run_provenance,
            "machine": page.machine_line(), "workers": args.workers, "duration_s": args.duration,
            "warm_up_s": args.warm_up, "rss_gate": args.rss_gate, "load_rss_gate": args.load_rss_gate,
            "sample_every_s": args.sample_every,
            "listeners": args.listeners,
            "churn_per_minute": args.churn, "posts_per_second": args.posts_per_second,
            "hostile_per_second": args.hostile_per_second, "faults": fault_note() if server.faulted else None,
            "server_env": env, "driver_counters": final.get("counters", {}),
            "verdicts": verdicts, "return_to_idle": returned, "poll_timeout_s": args.poll_timeout,
            "before_any_load": {k: v for k, v in cold.items() if k in sampler.kinds}, "idle": idle,
        }
        failed = [v for v in verdicts if not v["passed"]] + [r for r in returned["figures"] if not r["passed"]]
        errors = load_errors(final.get("counters", {}))
        result["load_errors"] = errors
        result["passed"] = not failed and not errors
        if trace_dir and failed:
            result["growing_sites"] = {str(pid): growing_sites(trace_dir, pid) for pid in sampler.workers}
        write_report(report_dir, result, sampler)
        print_verdicts(result)
        return 0 if result["passed"] else 1
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait(10)
        if server is not None:
            server.stop()
        if redis is not None:
            redis.stop()


def prefill_bus_stream(url):
    import redis
    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    for number in range(BUS_PREFILL):
        pipe.xadd(BUS_STREAM, {"r": "soak-prefill", "i": number + 1, "f": "soak",
                               "c": "message %d" % number, "t": "%.6f" % time.time()})
    pipe.execute()
    client.close()


def start_driver(args, server, duration, status_path, seed, log_path):
    return subprocess.Popen(
        [sys.executable, "-m", "bench.soak_driver", "--url", server.url, "--duration", str(duration),
         "--status", status_path, "--listeners", str(args.listeners), "--churn", str(args.churn),
         "--posts-per-second", str(args.posts_per_second), "--hostile-per-second", str(args.hostile_per_second),
         "--room-life", str(args.room_life), "--status-every", str(min(args.sample_every, 10.0)),
         "--poll-timeout", str(args.poll_timeout), "--seed", str(seed)],
        cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def wait_for_counts(sampler, cold, wait):
    """Until the connection counts are back at their values before any load."""
    deadline = time.monotonic() + wait
    names = [name for name in cold if name.endswith(" connections") and "beyond" not in name]
    while time.monotonic() < deadline:
        row = sampler.sample("cooling")
        if all(row.get(name) == cold[name] for name in names):
            return True
        time.sleep(2.0)
    return False


def fault_note():
    return ", ".join("%s=%s" % item for item in bench_environment().items() if item[1])


def brief(row):
    keys = [k for k in row if k.endswith(("rss", "beyond connections", "connections", "rooms above live"))]
    return ", ".join("%s %s" % (k, size(row[k]) if k.endswith("rss") else row[k]) for k in keys)


def load_errors(counters):
    """What the load saw go wrong on the server's side: any 5xx, or a hostile client the
    server never closed."""
    return {k: v for k, v in counters.items()
            if re.search(r"status_5\d\d|_not_closed$", k)}


def return_to_idle(sampler, idle, wait):
    """After the load: sample until each figure is back at its idle value (exactly for
    counts, within IDLE_RETURN for RSS), or `wait` seconds pass."""
    deadline = time.monotonic() + wait
    ended = time.monotonic()
    wanted = [k for k, kind in sampler.kinds.items() if k in idle and kind in (MEMORY, EXACT, CHURNING)
              and ("rss" in k or "descriptors" in k or k.endswith("connections"))]

    def back(row, name):
        if name not in row:
            return False
        if name.endswith("rss"):
            return row[name] <= idle[name] * (1 + IDLE_RETURN)
        return row[name] == idle[name]

    row = sampler.sample("after")
    while time.monotonic() < deadline and not all(back(row, name) for name in wanted):
        time.sleep(2.0)
        row = sampler.sample("after")
    took = time.monotonic() - ended
    figures = [{"figure": name, "idle": idle[name], "after": row.get(name), "passed": back(row, name)}
               for name in wanted]
    return {"seconds": took, "wait": wait, "figures": figures}


def judge_all(sampler, args):
    steady = [row for row in sampler.rows if row.get("steady")]
    if len(steady) < 3:
        return [{"figure": "steady samples", "kind": "run", "passed": False,
                 "why": "%d samples after the warm-up: make the run longer than the warm-up" % len(steady)}]
    span = steady[-1]["t"] - steady[0]["t"]
    verdicts = []
    for name, kind in sampler.kinds.items():
        points = [(row["t"], row[name]) for row in steady if name in row]
        gate = args.load_rss_gate if name.startswith("load ") and args.load_rss_gate else args.rss_gate
        verdicts.append(judge(name, kind, points, span, args.listeners, gate))
    return verdicts


def rejudge(report_dir, warm_up):
    """The verdicts of a finished run's samples with another warm-up (its report stays)."""
    with open(os.path.join(report_dir, "soak.json")) as summary:
        result = json.load(summary)
    with open(os.path.join(report_dir, "samples.jsonl")) as samples:
        rows = [json.loads(line) for line in samples]
    loaded = [row for row in rows if row["phase"] in ("warm-up", "load")]
    steady = [row for row in loaded if row["t"] >= loaded[0]["t"] + warm_up]
    span = steady[-1]["t"] - steady[0]["t"]
    print("soak: %s judged again with a warm-up of %gs: %d samples over %.0fs"
          % (report_dir, warm_up, len(steady), span))
    verdicts = []
    for old in result["verdicts"]:
        name = old["figure"]
        # a process that was exiting read 0 (samples of runs before that was caught)
        points = [(row["t"], row[name]) for row in steady
                  if name in row and not (old["kind"] == MEMORY and name.endswith("rss") and not row[name])]
        verdicts.append(judge(name, old["kind"], points, span, result["listeners"],
                              result.get("rss_gate", RSS_GATE)))
        print("soak: " + verdict_line(verdicts[-1]))
    return 0 if all(v["passed"] for v in verdicts) else 1


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() + (
            "+changes" if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                         capture_output=True, text=True, timeout=10).stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -- the report -------------------------------------------------------------------------------------

def verdict_line(v):
    mark = "pass" if v["passed"] else "FAIL"
    if "per_hour" not in v:
        return "%s  %-44s %s" % (mark, v["figure"], v.get("why", ""))
    if v["kind"] == MEMORY:
        return "%s  %-44s %s/h [%s, %s]; %.0f B per connection-hour (upper %.0f): %s" % (
            mark, v["figure"], size(v["per_hour"]), size(v["per_hour_low"]), size(v["per_hour_high"]),
            v["per_connection_hour"], v["per_connection_hour_high"], v["why"])
    return "%s  %-44s %+.2f/h [%+.2f, %+.2f]; %s" % (
        mark, v["figure"], v["per_hour"], v["per_hour_low"], v["per_hour_high"], v["why"])


def print_verdicts(result):
    for v in result["verdicts"]:
        print("soak: " + verdict_line(v))
    back = result["return_to_idle"]
    for r in back["figures"]:
        print("soak: %s  after the load: %-32s idle %s, after %s" % (
            "pass" if r["passed"] else "FAIL", r["figure"], r["idle"], r["after"]))
    print("soak: back to idle in %.0fs (waited at most %gs)" % (back["seconds"], back["wait"]))
    if result["load_errors"]:
        print("soak: FAIL  the load saw: %s" % result["load_errors"])
    print("soak: load did %s" % ", ".join("%s %s" % kv for kv in sorted(result["driver_counters"].items())))
    for pid, sites in result.get("growing_sites", {}).items():
        print("soak: worker %s, top growing allocation sites (tracemalloc):" % pid)
        for line in sites:
            print("soak:   " + line)
    failed = [v["figure"] for v in result["verdicts"] if not v["passed"]]
    failed += ["%s after the load" % r["figure"] for r in back["figures"] if not r["passed"]]
    if result["passed"]:
        print("soak: PASSED: every figure flat over the steady part and back to idle after it")
    else:
        print("soak: FAILED: %s" % ", ".join(failed + (["load errors"] if result["load_errors"] else [])))


def write_report(report_dir, result, sampler):
    page.write_json(os.path.join(report_dir, "soak.json"), result)
    charts = []
    try:
        charts = draw_charts(report_dir, result, sampler)
    except ImportError:
        pass
    rows = [("Verdict", "PASSED" if result["passed"] else "FAILED", "pass" if result["passed"] else "fail")]
    rows += [(v["figure"], verdict_line(v)[6:].split(None, 0)[0], "pass" if v["passed"] else "fail")
             for v in result["verdicts"]]
    rows += [("%s after the load" % r["figure"], "idle %s, after %s" % (r["idle"], r["after"]),
              "pass" if r["passed"] else "fail") for r in result["return_to_idle"]["figures"]]
    notes = ["%s; commit %s; started %s; %s" % (result["command"], result["commit"], result["started"],
                                                result["machine"])]
    for pid, sites in result.get("growing_sites", {}).items():
        notes.append("worker %s, top growing allocation sites: %s" % (pid, " | ".join(sites[:8])))
    page.write_html(os.path.join(report_dir, "report.html"), "Soak: %s" % ("passed" if result["passed"] else "FAILED"),
                    "%d listeners, %g%% churn a minute, %g posts/s, %g hostile/s, %s of load, server %s"
                    % (result["listeners"], result["churn_per_minute"] * 100, result["posts_per_second"],
                       result["hostile_per_second"], "%gs" % result["duration_s"],
                       "gunicorn x%d (redis)" % result["workers"] if result["workers"] > 1 else "python chattle.py"),
                    rows, charts, notes=notes)


def draw_charts(report_dir, result, sampler):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    charts = []
    by_name = {v["figure"]: v for v in result["verdicts"]}
    for number, name in enumerate(sampler.kinds):
        scale = 2 ** 20 if name.endswith(("rss", "bytes")) else 1  # memory in MiB
        points = [(row["t"], row[name] / scale, row["phase"]) for row in sampler.rows if name in row]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(8, 3))
        if scale > 1:
            ax.set_ylabel("MiB")
        for phase, colour in (("cold", "#bbb"), ("cooling", "#bbb"), ("idle", "#888"), ("warm-up", "#e0a030"),
                              ("load", "#2060c0"), ("after", "#30a060")):
            xs = [t / 60 for t, _v, p in points if p == phase]
            ys = [v for _t, v, p in points if p == phase]
            ax.plot(xs, ys, ".", color=colour, label=phase, markersize=4)
        verdict = by_name.get(name)
        if verdict and "slope" in verdict:
            steady = [t for t, _v, p in points if p == "load"]
            xs = [min(steady), max(steady)]
            ax.plot([x / 60 for x in xs], [(verdict["intercept"] + verdict["slope"] * x) / scale for x in xs], "-",
                    color="#b3261e", label="fitted line")
        ax.set_xlabel("minutes")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        png = "figure-%02d.png" % number
        fig.savefig(os.path.join(report_dir, png), dpi=80)
        plt.close(fig)
        charts.append((png, verdict_line(verdict) if verdict else name))
    return charts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=seconds, default=None, help="load duration: 2h, 30m, 300s (default 2h)")
    parser.add_argument("--quick", action="store_true", help="about 5 minutes: 300 s of load, 90 s warm-up")
    parser.add_argument("--warm-up", type=seconds, default=None,
                        help="left out of the fit (default: 90 s quick, else a third of the run, at most 20 min)")
    parser.add_argument("--workers", type=int, default=1, help="1: python chattle.py; more: gunicorn on redis")
    parser.add_argument("--listeners", type=int, default=1000)
    parser.add_argument("--churn", type=float, default=0.10, help="share of listeners replaced a minute")
    parser.add_argument("--posts-per-second", type=float, default=10.0)
    parser.add_argument("--hostile-per-second", type=float, default=1.0)
    parser.add_argument("--room-life", type=float, default=60.0)
    parser.add_argument("--poll-timeout", type=int, default=20,
                        help="the timeout most listeners ask (a fifth ask 3 s); also how long the server "
                             "holds a left listener's poll")
    parser.add_argument("--sample-every", type=seconds, default=SAMPLE_EVERY)
    parser.add_argument("--prime", type=seconds, default=30.0,
                        help="seconds of load before the idle figures are taken (default %(default)s)")
    parser.add_argument("--idle-wait", type=seconds, default=75.0,
                        help="how long the figures get to return to idle (the longest poll, 20 s, plus the send "
                             "timeout, 30 s, and a margin)")
    parser.add_argument("--rss-gate", type=int, default=None,
                        help="bytes of memory growth allowed per held connection per hour (default %d; "
                             "%d with --quick)" % (RSS_GATE, QUICK_RSS_GATE))
    parser.add_argument("--load-rss-gate", type=int, default=None,
                        help="the load process's own memory gate, when it differs from --rss-gate: a run of a "
                             "minute or two is still the load process's warm-up (its buffers and tallies grow "
                             "with the connections it has made), while the server's must already be flat")
    parser.add_argument("--trace", action="store_true", help="tracemalloc in the workers; top growing sites on failure")
    parser.add_argument("--out", help="report directory (default reports/<timestamp>-soak)")
    parser.add_argument("--verbose", action="store_true", help="print each sample")
    parser.add_argument("--rejudge", metavar="REPORT_DIR",
                        help="judge the samples of a finished run again with --warm-up, and stop")
    args = parser.parse_args(argv)
    if args.rejudge:
        return rejudge(args.rejudge, args.warm_up or 0.0)
    if args.duration is None:
        args.duration = QUICK_DURATION if args.quick else 7200.0
    if args.rss_gate is None:
        args.rss_gate = QUICK_RSS_GATE if args.quick else RSS_GATE
    if args.warm_up is None:
        args.warm_up = QUICK_WARM_UP if args.quick else min(WARM_UP_MAX, args.duration / 3)
    if args.warm_up >= args.duration:
        parser.error("--warm-up must be shorter than --duration")
    try:
        return run(args)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print("soak: the run could not be made: %s" % exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
