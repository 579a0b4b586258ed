"""`make capacity`: the largest number of held polls each server wakes within the objective.

For each server (Chattle with 1, 2 and 4 workers, the aiohttp references, and Chattle
deliberately slowed), search the largest N at which one post reaches every one of N held
polls with p99 wake-up at or under the objective:

- a run: a fresh server, N polls parked by the lean rig (bench/rig.py), one post, every
  answer timed. It fails on a poll not held or not answered, a message missing from any
  answer, the rig's client lag (p99) over a tenth of the p99 it measured, or p99 over the
  objective;
- a probe: up to 3 runs at one N; it passes when 2 pass (it stops as soon as that is decided);
- the search: N grows x1.5 from --start until a probe fails, then bisects between the last
  pass and the first fail until the bracket is within 5 %; at most --max-probes probes per
  server and --time-limit seconds for the whole run. The servers' searches take turns, a
  probe each, so on a shared machine all of them meet the same spells of other work.

Past the shell's 20 000 descriptors: the open-file limit is raised as far as allowed (root
may go to fs.nr_open) before any server or client process starts, so all inherit it; the rig
spreads the polls over client processes of at most 8 000 sockets, each from its own source
address. Preflight names any limit that stays below what the search may try, and the command
that raises it. Where the hold itself runs out (memory, descriptors, ports: whichever comes
first) is reported apart from where the fan-out misses the objective.

    python -m bench.capacity                               # every server (13 minutes here, contended)
    python -m bench.capacity --workers 1 --peers uvloop    # one worker beside the uvloop peer
    python -m bench.capacity --slo-ms 200 --start 2000
"""

import argparse
import math
import os
import re
import statistics
import sys
import time

from bench.rig import PER_PROCESS, Rig, raise_open_file_limit
from bench.sweep import NCHAN_PEER, measure_point, median_point, peer_labels, start_server, wire_of
from harness.processes import CleanUp, RedisServer
from harness.system_packages import require_or_exit
from instruments import history
from instruments.measures import (
    CLIENT_LAG_SHARE,
    client_bound,
    cpu_per_delivery,
    machine_busy_seconds,
    ms,
    own_cpu_seconds,
)
from instruments.page import machine_description, machine_line, new_report_dir, write_html, write_json
from instruments.provenance import provenance

GROWTH = 1.5        # the geometric step until a probe fails
PRECISION = 0.05    # bisect until (first fail - last pass) <= 5 % of the last pass
REPEATS = 3         # runs per probe, each on a fresh server ...
NEEDED = 2          # ... of which this many must pass
LAG_FLOOR_SHARE = 0.02  # client lag under this share of the objective never fails a run (with the
                        # shared rule, instruments.measures.client_bound): a lag of a few ms cannot
                        # move a verdict at 500 ms, and failing 30 ms runs on it would end the search
                        # far below the objective
SMALLEST = 10       # below this many polls a failing server has no capacity at all
SLOWED_SQUARES = 240  # CHATTLE_BENCH_EXTRA_WORK: about 30 % more work per answer (80 is about 10 %)
SERVER_DESCRIPTOR_MARGIN = 200  # listener, logs, redis and a worker's pipes
NR_OPEN, FILE_MAX = "/proc/sys/fs/nr_open", "/proc/sys/fs/file-max"
PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
EXTRA_WORK_VARIABLE = "CHATTLE_BENCH_EXTRA_WORK"  # chattle.py's, by name: the harness never imports the product

# What a failed connect says about the resource the hold ran out of.
RESOURCE_OF_ERROR = {"EMFILE": "descriptors", "ENFILE": "descriptors", "EADDRNOTAVAIL": "ports",
                     "EADDRINUSE": "ports", "ENOMEM": "memory", "ENOBUFS": "memory"}


# -- the search: pure, given a probe ------------------------------------------------------------

def repeated_verdict(run_once, repeats=REPEATS, needed=NEEDED):
    """Call run_once(i) (truthy: that run passed) until `needed` passes or until they can
    no longer be reached; (passed, [each run's result])."""
    runs, passes = [], 0
    while passes < needed and len(runs) - passes <= repeats - needed:
        result = run_once(len(runs))
        runs.append(result)
        passes += bool(result)
    return passes >= needed, runs


def next_count(passed, failed, current, growth=GROWTH, precision=PRECISION, ceiling=None, smallest=SMALLEST):
    """The N to probe next, or (None, why the search ends).

    `passed`/`failed`: the largest N that passed and the smallest that failed so far (None
    if none yet); `current`: the N just probed."""
    if failed is None:
        if ceiling is not None and passed is not None and passed >= ceiling:
            return None, "ceiling"
        step = max(current + 1, int(math.ceil(current * growth)))
        return (step if ceiling is None else min(step, ceiling)), None
    if passed is None:
        step = int(current / growth)
        if step < smallest:
            return None, "nothing passed"
        return step, None
    if failed - passed <= max(1, precision * passed):
        return None, "converged"
    return (passed + failed) // 2, None


class Search:
    """One server's search, a probe at a time: `count` is the N to probe next (None once it
    has stopped), `record` takes that probe's outcome (a dict with "passed")."""

    def __init__(self, start, growth=GROWTH, precision=PRECISION, max_probes=20, ceiling=None, smallest=SMALLEST):
        self.growth, self.precision, self.max_probes = growth, precision, max_probes
        self.ceiling, self.smallest = ceiling, smallest
        self.passed = self.failed = self.stopped = None
        self.trail = []
        self.count = start if ceiling is None else min(start, ceiling)

    def record(self, outcome):
        count = self.count
        self.trail.append(dict(outcome, count=count))
        if outcome["passed"]:
            self.passed = count if self.passed is None else max(self.passed, count)
        else:
            self.failed = count if self.failed is None else min(self.failed, count)
        self.count, self.stopped = next_count(self.passed, self.failed, count, self.growth, self.precision,
                                              self.ceiling, self.smallest)
        if self.stopped is None and len(self.trail) >= self.max_probes:
            self.stop("probe limit")

    def stop(self, why):
        if self.stopped is None:
            self.count, self.stopped = None, why

    def result(self):
        passed, failed = self.passed, self.failed
        converged = passed is not None and failed is not None and failed - passed <= max(1, self.precision * passed)
        return {"capacity": passed, "bracket": [passed, failed], "converged": converged, "stopped": self.stopped,
                "bracket_share": (failed - passed) / passed if passed and failed else None, "probes": self.trail}


def search(probe, start, growth=GROWTH, precision=PRECISION, max_probes=20, time_limit=None, ceiling=None,
           clock=time.monotonic, smallest=SMALLEST):
    """Search the largest N for which probe(N) passes; probe returns a dict with "passed".

    Returns capacity (the largest N that passed, None if none), the bracket [last pass,
    first fail], whether it is within `precision`, why the search stopped, and every probe."""
    return search_together({None: probe}, start, growth, precision, max_probes, time_limit, ceiling, clock,
                           smallest)[None]


def search_together(probes, start, growth=GROWTH, precision=PRECISION, max_probes=20, time_limit=None,
                    ceiling=None, clock=time.monotonic, smallest=SMALLEST):
    """Several servers' searches, {key: probe}, a probe of each in turn: on a shared machine
    whose other work comes and goes, every server then meets the same spells of it, and two
    capacities compare. Returns {key: the result `search` gives}."""
    started = clock()
    searches = {key: Search(start, growth, precision, max_probes, ceiling, smallest) for key in probes}
    while any(s.count is not None for s in searches.values()):
        for key, one in searches.items():
            if one.count is None:
                continue
            if time_limit is not None and clock() - started >= time_limit:
                one.stop("time limit")
                continue
            one.record(probes[key](one.count))
    return {key: one.result() for key, one in searches.items()}


# -- judging one run -------------------------------------------------------------------------------

def run_failures(point, slo, lag_floor_share=LAG_FLOOR_SHARE):
    """Why one rig run fails the objective (an empty list: it passes)."""
    reasons = []
    requested = point["requested"]
    if point["parked"] < requested:
        reasons.append("hold: %d of %d polls connected (%s)" % (point["parked"], requested, connect_error_text(point)))
    elif point["held_confirmed"] < requested:
        reasons.append("hold: the server confirmed %d of %d polls held" % (point["held_confirmed"], requested))
    if reasons and not point["latency"]["count"]:
        return reasons  # the server held too few to post to: no fan-out was measured
    if point["unanswered"]:
        reasons.append("unanswered: %d polls" % point["unanswered"])
    if point["complete_listeners"] < point["parked"] - point["unanswered"]:
        reasons.append("delivery: %d answers without the message"
                       % (point["parked"] - point["unanswered"] - point["complete_listeners"]))
    p99 = point["latency"]["p99"]
    if p99 is None or p99 > slo:
        reasons.append("p99 %s ms over %g ms" % ("-" if p99 is None else "%.0f" % (p99 * 1000), slo * 1000))
    lag = point["client_lag"]["p99"]
    if p99 is not None and client_bound(lag, p99, floor=lag_floor_share * slo):
        reasons.append("client lag p99 %.1f ms over %g %% of p99" % (lag * 1000, CLIENT_LAG_SHARE * 100))
    return reasons


def connect_error_text(point):
    errors = point.get("connect_errors") or {}
    return ", ".join("%s x%d" % item for item in sorted(errors.items())) or "no connect error"


def hold_resource(point, per_process=None, processes=1):
    """The resource a run's hold ran out of (None: it held). A server process that stopped at
    `per_process` polls (its descriptor limit less its own files), or `processes` of them sent
    more than they may all hold (a full server answers no /stats), ran out of descriptors;
    otherwise the client's connect errors say which."""
    if point["parked"] >= point["requested"] and point["held_confirmed"] >= point["requested"]:
        return None
    held = [int(v) for v in (point.get("held_per_pid") or {}).values()]
    if per_process and ((held and max(held) >= per_process) or point["parked"] >= per_process * processes):
        return "descriptors"
    errors = point.get("connect_errors") or {}
    for name in sorted(errors, key=lambda n: -errors[n]):
        if name in RESOURCE_OF_ERROR:
            return RESOURCE_OF_ERROR[name]
    return "server" if point["parked"] >= point["requested"] else "connect"


# -- where the hold runs out, from the machine's limits ---------------------------------------------

def read_number(path, index=0):
    try:
        with open(path) as source:
            return int(source.read().split()[index])
    except (OSError, ValueError, IndexError):
        return None


def ports_per_source():
    low, high = read_number(PORT_RANGE, 0), read_number(PORT_RANGE, 1)
    return None if low is None or high is None else high - low + 1


def hold_ceilings(server_processes, machine_bytes_per_poll=None):
    """Held polls each resource allows on this machine, client and server both on it.

    descriptors: every server process's open-file limit (what this run raised it to), and the
    system-wide fs.file-max shared by both ends (two descriptors per held poll on loopback);
    ports: one source address's ephemeral range to one server port, times the source
    addresses the rig connects from (one per client process); memory: MemAvailable now over
    the whole machine's memory rise per held poll."""
    import resource

    import psutil
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    file_max = read_number(FILE_MAX)
    per_server = server_processes * max(0, soft - SERVER_DESCRIPTOR_MARGIN)
    descriptors = per_server if file_max is None else min(per_server, file_max // 2)
    per_source = ports_per_source()
    ceilings = {
        "descriptors": {"polls": descriptors, "figure": "open-file limit %d per server process x %d, fs.file-max %s"
                        % (soft, server_processes, file_max)},
        "ports": {"polls": None if per_source is None else per_source * 254,
                  "figure": "%s ephemeral ports per source address; the rig connects each client process of at "
                            "most %d polls from its own 127.0.0.x (254 of them)" % (per_source, PER_PROCESS)},
    }
    available = psutil.virtual_memory().available
    if machine_bytes_per_poll and machine_bytes_per_poll > 0:
        ceilings["memory"] = {"polls": int(available / machine_bytes_per_poll),
                              "figure": "%.1f GiB available / %.0f B per held poll (whole machine, both ends)"
                                        % (available / 2 ** 30, machine_bytes_per_poll)}
    else:
        ceilings["memory"] = {"polls": None, "figure": "%.1f GiB available; no per-poll figure" % (available / 2 ** 30)}
    known = {name: c for name, c in ceilings.items() if c["polls"] is not None}
    first = min(known, key=lambda name: known[name]["polls"]) if known else None
    return {"first": first, "polls": known[first]["polls"] if first else None, "ceilings": ceilings}


def preflight(max_polls):
    """Raise the open-file limit as far as allowed; name each limit that stays below what the
    search may try, with the command that raises it. Returns (notes, polls one server process
    may hold under its descriptor limit)."""
    wanted = max_polls + SERVER_DESCRIPTOR_MARGIN
    soft, hard = raise_open_file_limit()
    notes = ["open-file limit raised to %d (soft) / %d (hard); fs.nr_open %s" % (soft, hard, read_number(NR_OPEN))]
    if soft < wanted:
        nr_open = read_number(NR_OPEN) or 0
        if nr_open < wanted:
            notes.append("LIMIT: fs.nr_open is %d, below %d. As root: `sysctl -w fs.nr_open=%d`."
                         % (nr_open, wanted, wanted))
        # root without CAP_SYS_RESOURCE (a container) may not raise it either
        notes.append("LIMIT: %d open files per process (hard %d), below the %d a server process holding %d polls "
                     "needs, and this process may not raise it (%s). Raise it where it is set: as root with "
                     "CAP_SYS_RESOURCE, `prlimit --pid $$ --nofile=%d:%d` on the shell that runs make, or a "
                     "nofile line in /etc/security/limits.conf, or `--ulimit nofile=%d:%d` for a container. Until "
                     "then each server process holds at most about %d polls: past that its hold runs out of "
                     "descriptors, and the search brackets that."
                     % (soft, hard, wanted, max_polls,
                        "root without CAP_SYS_RESOURCE" if os.geteuid() == 0 else "not root",
                        wanted, wanted, wanted, wanted, soft - SERVER_DESCRIPTOR_MARGIN))
    file_max = read_number(FILE_MAX)
    if file_max is not None and file_max < 2 * wanted:
        notes.append("LIMIT: fs.file-max %d is below the %d descriptors both ends need. As root: "
                     "`sysctl -w fs.file-max=%d`." % (file_max, 2 * wanted, 2 * wanted))
    return notes, max(1, soft - SERVER_DESCRIPTOR_MARGIN)


# -- the servers and their probes ---------------------------------------------------------------------

def server_list(workers, peers, slowed):
    """[{"label", "workers" (an int, or a peer's label), "env"}] in the order searched: one
    worker and the first peer (uvloop's, when searched) first, so a run cut short still
    compares them. `peers`: their labels (bench.sweep.peer_labels)."""
    servers = []
    chattle = [{"label": "Chattle, %d worker%s" % (w, "" if w == 1 else "s"), "workers": w, "env": None}
               for w in workers]
    servers += chattle[:1]
    chosen_peers = list(peers)
    servers += [{"label": p, "workers": p, "env": None} for p in chosen_peers[:1]]
    if slowed and 1 in workers:
        servers.append({"label": "Chattle, 1 worker, slowed (+%d squares per answer)" % slowed, "workers": 1,
                        "env": {EXTRA_WORK_VARIABLE: str(slowed)}})
    servers += [{"label": p, "workers": p, "env": None} for p in chosen_peers[1:]]
    servers += chattle[1:]
    return servers


def compact(point, failures, per_process=None, processes=1):
    """The figures of one run that the report and results.json keep."""
    lat = point["latency"]
    return {"requested": point["requested"], "parked": point["parked"], "held": point["held_confirmed"],
            "delivered": point["delivered"], "unanswered": point["unanswered"],
            "complete_listeners": point["complete_listeners"], "p50_s": lat["p50"], "p99_s": lat["p99"],
            "max_s": lat["max"], "client_lag_p99_s": point["client_lag"]["p99"],
            "last_delivery_s": point["last_delivery_s"], "server_cpu_s": point["server_cpu_s"],
            "client_cpu_s": point["client_cpu_s"], "bytes_per_poll": point["bytes_per_poll"],
            "machine_bytes_per_poll": point["machine_bytes_per_poll"], "connect_errors": point["connect_errors"],
            "client_processes": point["client_processes"], "held_per_pid": point.get("held_per_pid"),
            "machine_busy_cores": point.get("machine_busy_cores"),
            "hold_resource": hold_resource(point, per_process, processes),
            "failures": failures, "passed": not failures}


def failed_run(count, error):
    return {"requested": count, "passed": False, "failures": ["error: %s" % str(error).splitlines()[0][:200]],
            "p50_s": None, "p99_s": None, "hold_resource": None}


class RunVerdict(dict):
    """One run's figures; truthy when it passed (what repeated_verdict counts)."""

    def __bool__(self):
        return bool(self.get("passed"))


def make_probe(server, slo, redis_url, log_dir, repeats=REPEATS, needed=NEEDED, say=print, per_process=None):
    """probe(N) for `search`: up to `repeats` runs at N, each on a fresh server; `per_process`:
    the polls one server process may hold under its descriptor limit."""
    def run_once(count, index):
        began, busy, own = time.monotonic(), machine_busy_seconds(), own_cpu_seconds()
        try:
            point = measure_point(server["workers"], count, redis_url, log_dir, env=server["env"],
                                  spread_sources=True)
        except (RuntimeError, OSError) as error:
            verdict = RunVerdict(failed_run(count, error))
        else:
            processes = server["workers"] if isinstance(server["workers"], int) else 1
            verdict = RunVerdict(compact(point, run_failures(point, slo), per_process, processes))
        # What the rest of the machine (other users' work) took of its cores during this run
        others = machine_busy_seconds() - busy - (own_cpu_seconds() - own)
        verdict["other_work_cores"] = max(0.0, others) / max(1e-6, time.monotonic() - began)
        say("  %s, %d polls, run %d: %s" % (server["label"], count, index + 1, run_line(verdict)))
        return verdict

    def probe(count):
        passed, runs = repeated_verdict(lambda index: run_once(count, index), repeats, needed)
        say("%s, %d polls: %s (%d of %d runs passed)" % (server["label"], count, "PASS" if passed else "fail",
                                                         sum(map(bool, runs)), len(runs)))
        return {"passed": passed, "runs": [dict(run) for run in runs]}
    return probe


def run_line(run):
    if run.get("p99_s") is None:
        return "; ".join(run["failures"])
    text = "p50 %.0f ms, p99 %.0f ms, last %.0f ms, lag p99 %.1f ms, other work %.1f cores" % (
        run["p50_s"] * 1000, run["p99_s"] * 1000, (run["last_delivery_s"] or 0) * 1000,
        (run["client_lag_p99_s"] or 0) * 1000, run.get("other_work_cores") or 0)
    return text + (" -- " + "; ".join(run["failures"]) if run["failures"] else " -- pass")


# -- figures at capacity ----------------------------------------------------------------------------

def at_capacity(result):
    """The median passing run (by p99) of the probe at the capacity, with the per-delivery CPU of
    server and client beside each other (instruments.measures.cpu_per_delivery)."""
    capacity = result["capacity"]
    if capacity is None:
        return None
    runs = [run for probe in result["probes"] if probe["count"] == capacity for run in probe["runs"]
            if run["passed"]]
    if not runs:
        return None
    chosen = median_point([dict(run, latency={"p99": run["p99_s"]}, bytes_per_poll=run["bytes_per_poll"])
                           for run in runs])
    chosen.pop("latency", None)
    chosen["server_us_per_delivery"] = cpu_per_delivery(chosen["server_cpu_s"], chosen["delivered"])
    chosen["client_us_per_delivery"] = cpu_per_delivery(chosen["client_cpu_s"], chosen["delivered"])
    machine = [run["machine_bytes_per_poll"] for run in runs if run.get("machine_bytes_per_poll")]
    chosen["machine_bytes_per_poll_median"] = statistics.median(machine) if machine else None
    return chosen


FAILURE_KINDS = ("hold", "error", "unanswered", "delivery", "p99", "client lag")


def limited_by(result):
    """What the failing runs at the first failing count ran into, most often first: "hold
    (<resource>)" when they failed to hold the polls, else the objective's criteria ("p99",
    "client lag", "delivery", "unanswered"); None when nothing failed."""
    failed = result["bracket"][1]
    if failed is None:
        return None
    runs = [run for probe in result["probes"] if probe["count"] == failed for run in probe["runs"]
            if not run["passed"]]
    resources = [run["hold_resource"] for run in runs if run.get("hold_resource")]
    if resources and len(resources) * 2 >= len(runs):
        return "hold (%s)" % max(set(resources), key=resources.count)
    kinds = [kind for run in runs for kind in FAILURE_KINDS
             if any(failure.startswith(kind) for failure in run["failures"])]
    ranked = sorted(set(kinds), key=lambda kind: (-kinds.count(kind), FAILURE_KINDS.index(kind)))
    return "objective: " + ", ".join(ranked) if ranked else "objective"


# -- a capacity the rig could not measure ----------------------------------------------------------

SATURATED_SHARE = 0.95  # a fan-out with the machine's cores this busy (anyone's work): the machine was the limit
MEASURE_FURTHER = ("to measure further, run the load from another host (make load-worker) or give the server "
                   "fewer workers per core")


def rig_limit(result, cores=None):
    """Whether the bracket ended on the measuring rather than on the server: None, or {"limit": "load
    generator" (at least half the failing runs at the first failing count failed on the rig's own lag)
    or "machine" (at least half ran their fan-out with SATURATED_SHARE of the cores busy), "at": that
    count, "cores"}. A hold that ran out is the server's own limit, never the rig's."""
    failed = result["bracket"][1]
    if failed is None or (result.get("limited_by") or "").startswith("hold"):
        return None
    cores = cores or os.cpu_count()
    runs = [run for probe in result["probes"] if probe["count"] == failed for run in probe["runs"]
            if not run["passed"]]
    if not runs:
        return None
    lagging = [run for run in runs if any(f.startswith("client lag") for f in run.get("failures") or ())]
    saturated = [run for run in runs if (run.get("machine_busy_cores") or 0) >= SATURATED_SHARE * cores]
    for limit, which in (("load generator", lagging), ("machine", saturated)):
        if len(which) * 2 >= len(runs):
            return {"limit": limit, "at": failed, "cores": cores}
    return None


def capacity_text(result, limit=None):
    """A capacity as the verdict, the table and the chart say it: "at least 4,374; the load
    generator was the limit here" where the rig could not measure further (rig_limit)."""
    capacity = result["capacity"]
    if capacity is None:
        return None
    if limit is None:
        return "{:,}".format(capacity)
    return "at least {:,}; the {} was the limit here".format(capacity, limit["limit"])


def rig_limit_detail(limit):
    """Why the rig was the limit, and what would measure further."""
    if limit["limit"] == "load generator":
        cause = "at {:,} the rig fell behind the answers (its client lag failed the runs)".format(limit["at"])
    else:
        cause = "at {:,} the machine's {} cores were busy through the fan-outs that failed".format(
            limit["at"], limit["cores"])
    return "%s, not the server; %s" % (cause, MEASURE_FURTHER)


HOLD_OVER = 1.05  # the hold check: this much short of where the limits say the hold runs out, and past it


def check_hold(server, ceiling, redis_url, log_dir, per_process, say=print):
    """Hold `ceiling` / HOLD_OVER polls, then HOLD_OVER times `ceiling`, on fresh servers, without
    a post: the hold the limits predict, verified on both sides (one run each: a hold is not
    noisy). Not at `ceiling` itself: a gunicorn worker filled to its limit answers no /stats,
    and its polls would go uncounted."""
    processes = server["workers"] if isinstance(server["workers"], int) else 1
    checks = []
    for count in (int(ceiling / HOLD_OVER), int(ceiling * HOLD_OVER) + 1):
        try:
            instance = start_server(server["workers"], count, redis_url, log_dir, server["env"])
        except RuntimeError as error:
            checks.append({"requested": count, "held": None, "error": str(error).splitlines()[0][:200]})
            continue
        try:
            point = Rig(instance.url, spread_sources=True, wire=wire_of(server["workers"])).hold(
                count, instance.worker_pids())
        except (RuntimeError, OSError) as error:
            point = None
            checks.append({"requested": count, "held": None, "error": str(error).splitlines()[0][:200]})
        finally:
            instance.stop()
        if point is not None:
            checks.append({"requested": count, "parked": point["parked"], "held": point["held_confirmed"],
                           "held_per_pid": point["held_per_pid"], "connect_errors": point["connect_errors"],
                           "hold_resource": hold_resource(point, per_process, processes)})
        check = checks[-1]
        say("  %s, hold check at %d polls: %s" % (server["label"], count, "held" if check.get("held") == count
                                                  and not check.get("hold_resource") else
                                                  "held %s (%s)" % (check.get("held"), check.get("hold_resource")
                                                                    or check.get("error"))))
    return checks


def observed_hold_limit(result):
    """The smallest N where a run's hold itself ran out, and of what (None: every hold held)."""
    for probe in sorted(result["probes"], key=lambda p: p["count"]):
        for run in probe["runs"]:
            if run.get("hold_resource"):
                return {"polls": probe["count"], "resource": run["hold_resource"],
                        "detail": "; ".join(f for f in run["failures"] if f.startswith("hold"))}
    return None


# -- the report ---------------------------------------------------------------------------------------

def write_chart(report_dir, results, slo):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for entry in results:
        runs = sorted((run for probe in entry["search"]["probes"] for run in probe["runs"]
                       if run.get("p99_s") is not None), key=lambda run: run["requested"])
        if not runs:
            continue
        by_count = {}
        for run in runs:
            by_count.setdefault(run["requested"], []).append(run["p99_s"] * 1000)
        xs = sorted(by_count)
        line, = ax.plot(xs, [statistics.median(by_count[x]) for x in xs], marker="o", label=entry["label"])
        ax.scatter([r["requested"] for r in runs], [r["p99_s"] * 1000 for r in runs], s=10, alpha=.45,
                   color=line.get_color())
        capacity = entry["search"]["capacity"]
        if capacity:
            # a lower bound (the rig was the limit) is dotted and marked "at least"
            lower = bool(entry["search"].get("rig_limit"))
            ax.axvline(capacity, color=line.get_color(), linestyle=":" if lower else "--", linewidth=1)
            ax.annotate(("at least %d (rig-limited)" if lower else "%d") % capacity, (capacity, slo * 1000),
                        textcoords="offset points", xytext=(3, 6), color=line.get_color(), fontsize=8, rotation=90)
    ax.axhline(slo * 1000, color="#b3261e", linewidth=1.2, linestyle=":", label="objective %g ms" % (slo * 1000))
    ax.set_xlabel("held polls (N)")
    ax.set_ylabel("p99 wake-up latency (ms)")
    ax.set_yscale("log")
    ax.set_title("p99 wake-up against held polls; dashed: each server's capacity, dotted: a lower bound")
    ax.grid(alpha=.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(report_dir, "capacity.png"), dpi=90)
    plt.close(fig)


def verdict(results, slo, contended_note):
    """The paragraph a person can quote."""
    def holds(entry):
        search = entry["search"]
        if search["capacity"] is None:
            return "none of the counts tried (%d and fewer)" % min(p["count"] for p in search["probes"]) \
                if search["probes"] else "nothing: no probe ran"
        return ("at least {:,}" if search.get("rig_limit") else "{:,}").format(search["capacity"])

    def why(entry):
        search = entry["search"]
        bound, failed = search.get("limited_by") or "", search["bracket"][1]
        if search.get("rig_limit"):
            limit = search["rig_limit"]
            return "the %s was the limit here: %s" % (limit["limit"], rig_limit_detail(limit))
        if failed and bound == "hold (descriptors)":
            return "at %d it reaches the descriptor ceiling: %s" % (
                failed, entry["hold_ceiling"]["ceilings"]["descriptors"]["figure"])
        if failed and bound.startswith("hold"):
            return "at %d its %s runs out" % (failed, bound)
        if failed:
            return "at %d it misses on %s" % (failed, bound.replace("objective: ", ""))
        return "the search stopped on its %s before a count failed" % search["stopped"]
    if not results:
        return contended_note
    first = results[0]
    name = "One worker of Chattle" if first["workers"] == 1 and not first["env"] else first["label"]
    text = ("%s on this %d-core machine holds %s long-polls with p99 wake-up under %g ms and every poll answered "
            "with the message (%s)" % (name, os.cpu_count(), holds(first), slo * 1000, why(first)))
    text += "".join("; %s holds %s (%s)" % (entry["label"], holds(entry), why(entry)) for entry in results[1:])
    return text + ". " + contended_note


def main(argv=None):
    with CleanUp.armed():  # a SIGTERM takes Ctrl-C's way: every server and client stopped by pid
        return search_capacity(argv)


def search_capacity(argv):
    parser = argparse.ArgumentParser(description="Capacity search: the largest held-poll count each server wakes "
                                                 "within the p99 objective, with delivery verified")
    parser.add_argument("--workers", default="1,2,4", help="Chattle worker counts (default %(default)s)")
    parser.add_argument("--peers", default="uvloop,asyncio",
                        help="reference servers to search: uvloop, asyncio (the aiohttp ones), nchan (nginx with "
                             "Nchan), a list of them, 1 (all) or none (default %(default)s)")
    parser.add_argument("--slowed", type=int, default=SLOWED_SQUARES,
                        help="also search one worker doing this many extra squares per answer "
                             "(%s; 0 skips it; default %%(default)s, about 30 %%%% more work)" % EXTRA_WORK_VARIABLE)
    parser.add_argument("--slo-ms", type=float, default=500, help="p99 wake-up objective (default %(default)s ms)")
    parser.add_argument("--start", type=int, default=5000, help="first N probed (default %(default)s)")
    parser.add_argument("--max-polls", type=int, default=200000,
                        help="largest N probed, lowered to what the limits allow (default %(default)s)")
    parser.add_argument("--max-probes", type=int, default=14, help="probes per server at most (default %(default)s)")
    parser.add_argument("--time-limit", type=float, default=3600,
                        help="seconds for the whole search; the servers' searches take turns, a probe each "
                             "(default %(default)s)")
    parser.add_argument("--hold-check", action=argparse.BooleanOptionalAction, default=True,
                        help="after each search, hold 5 %% fewer polls than the limits allow and 5 %% more, "
                             "without a post, to verify where the hold runs out (default on)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="runs per probe (default %(default)s)")
    parser.add_argument("--needed", type=int, default=NEEDED, help="passing runs a probe needs (default %(default)s)")
    args = parser.parse_args(argv)
    slo = args.slo_ms / 1000.0
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    try:
        peers = peer_labels(args.peers)
    except ValueError as error:
        parser.error(str(error))
    servers = server_list(workers, peers, args.slowed)
    if not servers:
        parser.error("nothing to search: give --workers or --peers")
    if any(isinstance(s["workers"], int) and s["workers"] > 1 for s in servers):
        require_or_exit(["redis-server"], "capacity")
    if NCHAN_PEER in peers:
        require_or_exit(["nginx", "nchan"], "capacity")

    notes, per_server_process = preflight(args.max_polls)
    for note in notes:
        print("preflight: " + note, flush=True)
    report_dir = new_report_dir("capacity")
    info = machine_description()
    commit_at_start = history.git_state()
    run_provenance = provenance()  # the tree as it starts: a long run outlives a commit
    started = time.monotonic()
    redis = None
    results = []
    try:
        if any(isinstance(s["workers"], int) and s["workers"] > 1 for s in servers):
            redis = RedisServer(appendonly=False)
        redis_url = redis.url if redis else None
        probes, log_dirs = {}, {}
        for index, server in enumerate(servers):
            log_dirs[index] = os.path.join(report_dir, "logs", "".join(c if c.isalnum() else "-"
                                                                       for c in server["label"]))
            os.makedirs(log_dirs[index])
            probes[index] = make_probe(server, slo, redis_url, log_dirs[index], args.repeats, args.needed,
                                       per_process=per_server_process)
        # No ceiling below --max-polls: past a server's descriptors its hold fails, fast, and
        # the search brackets that as it brackets the objective.
        print("== %s, a probe of each in turn, from %d polls, %.0f s at most"
              % (", ".join(s["label"] for s in servers), args.start, args.time_limit), flush=True)
        found = search_together(probes, args.start, max_probes=args.max_probes, time_limit=args.time_limit,
                                ceiling=args.max_polls)
        for index, server in enumerate(servers):
            result = found[index]
            result["limited_by"] = limited_by(result)
            result["rig_limit"] = rig_limit(result)
            processes = server["workers"] if isinstance(server["workers"], int) else 1
            figures = at_capacity(result)
            hold = hold_ceilings(processes, figures and figures.get("machine_bytes_per_poll_median"))
            checks = []
            if args.hold_check and hold["polls"] and hold["polls"] <= args.max_polls:
                checks = check_hold(server, hold["polls"], redis_url, log_dirs[index], per_server_process)
            results.append({"label": server["label"], "workers": server["workers"], "env": server["env"],
                            "search": result, "at_capacity": figures, "hold_ceiling": hold, "hold_checks": checks,
                            "hold_observed": observed_hold_limit(result)})
            print("== %s: capacity %s, bracket %s (%s; %s)" % (server["label"], result["capacity"],
                                                              result["bracket"], result["stopped"],
                                                              result["limited_by"]), flush=True)
    finally:
        if redis is not None:
            redis.stop()
    args.provenance = run_provenance
    code = write_report(report_dir, results, args, slo, info, notes, time.monotonic() - started)
    append_to_history(results, args, report_dir, commit_at_start)
    return code


def append_to_history(results, args, report_dir, state):
    """One line per run in reports/history.jsonl: each server's capacity and its figures there."""
    figures = {}
    for entry in results:
        at = entry["at_capacity"] or {}
        key = re.sub(r"[^a-z0-9]+", "_", entry["label"].lower()).strip("_")
        figures[key + "_capacity"] = entry["search"]["capacity"]
        figures[key + "_capacity_is_lower_bound"] = bool(entry["search"].get("rig_limit"))
        figures[key + "_p99_s"] = at.get("p99_s")
        figures[key + "_bytes_per_poll"] = at.get("bytes_per_poll")
    settings = {"workers": args.workers, "peers": args.peers, "slowed": args.slowed, "slo_ms": args.slo_ms,
                "start": args.start, "max_polls": args.max_polls, "repeats": args.repeats, "needed": args.needed}
    history.append("capacity", settings, figures, report_dir=report_dir, state=state)


def write_report(report_dir, results, args, slo, info, notes, elapsed):
    load = os.getloadavg()
    others = [run["other_work_cores"] for entry in results for probe in entry["search"]["probes"]
              for run in probe["runs"] if run.get("other_work_cores") is not None]
    busy = statistics.median(others) if others else 0.0
    contended = ("Measured on a shared machine: other work took a median %.1f of its %d cores during the runs "
                 "(up to %.1f), so these capacities are lower, and noisier, than an idle machine's."
                 % (busy, os.cpu_count(), max(others)) if busy > 0.2 else
                 "Other work took a median %.1f of the machine's %d cores during the runs." % (busy, os.cpu_count()))
    text = verdict(results, slo, contended)
    write_chart(report_dir, results, slo)
    data = {"slo_s": slo, "growth": GROWTH, "precision": PRECISION, "repeats": args.repeats, "needed": args.needed,
            "lag_share": CLIENT_LAG_SHARE, "lag_floor_share": LAG_FLOOR_SHARE,
            "start": args.start, "max_polls": args.max_polls, "max_probes": args.max_probes,
            "time_limit_s": args.time_limit, "elapsed_s": elapsed, "machine": info, "load_average": load,
            "other_work_cores_median": busy, "provenance": getattr(args, "provenance", None),
            "preflight": notes, "verdict": text, "servers": results}
    write_json(os.path.join(report_dir, "results.json"), data)
    rows = [("verdict", text, "")]
    for entry in results:
        search, figures = entry["search"], entry["at_capacity"] or {}
        bracket = "[%s, %s)" % tuple("-" if b is None else b for b in search["bracket"])
        limit = search.get("rig_limit")
        rows.append(("%s: capacity" % entry["label"],
                     "%s, bracket %s%s, limited by: %s, stopped: %s, %d probes%s"
                     % (capacity_text(search, limit) or "none", bracket,
                        " (%.1f %%)" % (search["bracket_share"] * 100) if search["bracket_share"] else "",
                        search.get("limited_by") or "-", search["stopped"], len(search["probes"]),
                        " (a lower bound: %s)" % rig_limit_detail(limit) if limit else ""),
                     "lower bound" if limit else "pass" if search["converged"] else "fail"))
        if figures:
            rows.append(("%s: at capacity" % entry["label"],
                         "p50 %s ms, p99 %s ms, last delivery %s ms, %s B per held poll (server RSS), "
                         "server CPU %.2f s per fan-out (%.1f us per delivery), client CPU %.2f s (%.1f us)"
                         % (ms(figures["p50_s"], "%.0f"), ms(figures["p99_s"], "%.0f"),
                            ms(figures["last_delivery_s"], "%.0f"),
                            "%.0f" % figures["bytes_per_poll_median"] if figures.get("bytes_per_poll_median")
                            else "-", figures["server_cpu_s"] or 0, figures["server_us_per_delivery"] or 0,
                            figures["client_cpu_s"] or 0, figures["client_us_per_delivery"] or 0), ""))
        for check in entry.get("hold_checks") or ():
            held_all = check.get("held") == check["requested"] and not check.get("hold_resource")
            rows.append(("%s: hold check, %d polls, no post" % (entry["label"], check["requested"]),
                         "held all" if held_all else "held %s: %s (%s)" % (
                             check.get("held"), check.get("hold_resource") or check.get("error"),
                             connect_error_text(check) if check.get("connect_errors") is not None else ""),
                         "pass" if held_all else "fail"))
        hold, observed = entry["hold_ceiling"], entry["hold_observed"]
        rows.append(("%s: where the hold runs out" % entry["label"],
                     "%s first, at about %s polls (%s)%s"
                     % (hold["first"], hold["polls"], hold["ceilings"][hold["first"]]["figure"] if hold["first"]
                        else "", "; observed: %s at %d polls (%s)" % (observed["resource"], observed["polls"],
                                                                      observed["detail"]) if observed else
                        "; every hold tried held"), ""))
        for probe in search["probes"]:
            rows.append(("  %s, %d polls" % (entry["label"], probe["count"]),
                         " | ".join(run_line(run) for run in probe["runs"]), "pass" if probe["passed"] else "fail"))
    caption = ("Machine: %s. Each run: a fresh server, N polls on one room held by the lean rig (raw HTTP/1.1 on "
               "127.0.0.0/8, client processes of at most %d sockets), one post; p99 of the wake-up latency over "
               "every answer. A probe is %d runs, passing on %d. %s"
               % (machine_line(info), PER_PROCESS, args.repeats, args.needed, contended))
    write_html(os.path.join(report_dir, "report.html"), "Chattle capacity search", caption, rows,
               [("capacity.png", "p99 wake-up latency of every run (dots) and the median per probe (line) "
                 "against held polls, per server; the red dotted line is the %g ms objective, the dashed lines each "
                 "server's capacity, a dotted one marked \"at least\" a capacity the rig could not measure past (a "
                 "lower bound: the load generator or the machine was the limit). %s" % (slo * 1000, caption))],
               notes=list(notes) + [
                   "A run fails on a poll not held or unanswered, an answer without the message, the rig's "
                   "client lag p99 over %d %% of the p99 it measured (and over %g %% of the objective), or p99 "
                   "over the objective." % (CLIENT_LAG_SHARE * 100, LAG_FLOOR_SHARE * 100),
                   "A capacity is a lower bound (\"at least N\") where the bracket ended on the rig rather "
                   "than the server: at least half the failing runs at its first failing count failed on the "
                   "rig's client lag (the load generator was the limit), or ran their fan-out with %d %% or "
                   "more of the machine's cores busy (the machine was the limit). %s."
                   % (SATURATED_SHARE * 100, MEASURE_FURTHER[0].upper() + MEASURE_FURTHER[1:]),
                   "Where the hold runs out is computed from the machine's limits and the memory the holding "
                   "run used (whole machine, both ends, blurred by other work), apart from where the fan-out "
                   "misses the objective."],
               links=[("results.json", "results.json")])
    print(text)
    print("report: %s (%.0f s)" % (os.path.join(report_dir, "report.html"), elapsed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
