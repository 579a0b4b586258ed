"""`make bench`: capacity sweep over held-poll counts and worker counts.

For every (workers, held polls) point, repeated: start a fresh server (one worker:
python chattle.py on the in-memory bus; more: gunicorn on a shared redis-server), park
the polls with the lean rig, post once, time every answer. The median repeat of each
point is reported, with charts, results.json and results.csv under reports/<ts>-bench/.

    python -m bench.sweep                       # default sweep (a few minutes)
    python -m bench.sweep --quick               # about a minute
    python -m bench.sweep --target http://host:port [--target-pid PID]
    python -m bench.sweep --peers nchan         # beside nginx with Nchan only (none: no peer; 1: all)
    python -m bench.sweep --redis-cluster local # the buses side by side (bench/buses.py)

With --redis-cluster (`local`, or host:port[,...] of a running cluster), the same workers
are measured on a single redis-server and on the Redis Cluster, with the polls on one room
and spread over a room per master, beside one worker in memory, in alternation at each
count (default 5 000 and 10 000, 2 workers), with the CPU of the Redis nodes beside the
client's and the server's.

Beside Chattle's one-worker points, the reference servers of bench/peers/ (aiohttp on
asyncio's loop, and the same app on uvloop) and, asked for, nginx with Nchan (harness/nchan.py,
the C peer: one worker, speaking Nchan's long-poll through bench.wires) are measured by the
same rig at the same counts, and the report states the ratios Chattle / peer of memory per
held poll and of time per waiter against each.
"""

import argparse
import csv
import os
import statistics
import sys
import time

from bench import buses as bus_module
from bench.rig import Rig
from bench.wires import CHATTLE, NCHAN
from chattle_limits import raise_descriptor_limit
from harness.nchan import NchanServer
from harness.processes import ChattleServer, CleanUp, PeerServer, RedisServer
from harness.system_packages import require_or_exit
from instruments.measures import (
    cpu_per_delivery,
    machine_busy_seconds,
    ms,
    own_cpu_seconds,
    summed_rss,
    time_per_waiter,
)
from instruments.page import machine_description, machine_line, new_report_dir, write_html, write_json
from instruments.provenance import provenance

DESCRIPTOR_MARGIN = 200  # listener, logs, redis and the worker's pipes
# Each reference server: its label in reports, and its flags to bench.peers.aiohttp_chat.
PEERS = {"aiohttp reference": (), "aiohttp on uvloop": ("--uvloop",)}
NCHAN_PEER = "nginx with Nchan"  # the C peer (harness/nchan.py): one nginx worker
NCHAN_WORKLOAD = ("; nginx with Nchan = nginx and Debian's libnginx-mod-nchan, one worker process (its RSS and "
                  "CPU are the figures; the master, which only starts and stops it, is not counted), a channel per "
                  "room keeping 500 messages, Nchan's long-poll (If-Modified-Since / If-None-Match), its latency "
                  "from the rig's send of the post")
# The peers by the names PEERS= and --peers take; 1 (or all) names every one, 0 (or none) none.
PEER_NAMES = {"uvloop": "aiohttp on uvloop", "asyncio": "aiohttp reference", "nchan": NCHAN_PEER}
DEFAULT_PEERS = "uvloop,asyncio"


def peer_labels(names):
    """The peers' labels from PEERS='s text, in PEER_NAMES' order; ValueError names an unknown one."""
    given = [name.strip() for name in str(names).split(",") if name.strip()]
    if given in (["1"], ["all"]):
        return list(PEER_NAMES.values())
    if given in ([], ["0"], ["none"]):
        return []
    unknown = sorted(set(given) - set(PEER_NAMES))
    if unknown:
        raise ValueError("no such peer %s; choose from %s (1: all, 0: none)"
                         % (", ".join(unknown), ", ".join(PEER_NAMES)))
    return [label for name, label in PEER_NAMES.items() if name in given]


def is_peer(workers):
    return workers in PEERS or workers == NCHAN_PEER


def wire_of(workers):
    """The protocol the server of a point speaks (bench.wires)."""
    return NCHAN if workers == NCHAN_PEER else CHATTLE


def median_point(repeats):
    """The repeat whose p99 is the median one, so every figure of a point comes from one run."""
    ordered = sorted(repeats, key=lambda p: p["latency"]["p99"] if p["latency"]["p99"] is not None else 1e9)
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["repeats"] = len(repeats)
    chosen["p99_of_repeats"] = [p["latency"]["p99"] for p in repeats]
    per_poll = [p["bytes_per_poll"] for p in repeats if p["bytes_per_poll"] is not None]
    chosen["bytes_per_poll_median"] = statistics.median(per_poll) if per_poll else None
    return chosen


def start_server(workers, count, redis_url, log_dir, env=None, name=""):
    """A fresh server for one run: a peer of PEERS by its label, or Chattle with `workers`
    workers (more than one on the shared redis at `redis_url`); `env` adds to its environment;
    `name` tells its log apart from another bus's at the same point. Nchan writes its config,
    logs and pid into a folder of its own per run."""
    if workers == NCHAN_PEER:
        run_dir = os.path.join(log_dir, "nchan-n%d-%d" % (count, time.monotonic_ns()))
        return NchanServer(run_dir)
    if workers in PEERS:
        return PeerServer(log_path=os.path.join(log_dir, "peer-%s-n%d.log" % (workers.replace(" ", "-"), count)),
                          args=PEERS[workers])
    return ChattleServer(workers=workers, redis_url=redis_url if workers > 1 else None, env=env,
                         log_path=os.path.join(log_dir, "server%s-w%d-n%d.log" % (name, workers, count)))


def measure_point(workers, count, redis_url, log_dir, env=None, spread_sources=False, bus=None):
    """Start a fresh server, park `count` polls with the rig, post once, stop the server.
    `bus` (bench.buses.Bus): start it on that bus, and read its Redis CPU around the fan-out."""
    if bus is not None:
        env = dict(env or {}, **bus.env)
    server = start_server(workers, count, redis_url, log_dir, env,
                          name="-" + bus.name.replace(" ", "-").lower() if bus else "")
    try:
        pids = server.worker_pids()
        rig = Rig(server.url, spread_sources=spread_sources, rooms=bus.rooms if bus is not None else None,
                  wire=wire_of(workers))
        rig.cursors()  # the rooms exist and their code paths are warm before the idle reading
        time.sleep(0.2)
        point = rig.run(count, server_pids=pids, rss_idle=summed_rss(pids),
                        backend_cpu=bus.redis_cpu_seconds if bus is not None and bus.nodes else None)
    finally:
        server.stop()
    point["workers"] = workers
    if bus is not None:
        point["bus"], point["series"] = bus.name, bus.label
    return point


def peer_ratios(points):
    """Per peer and count measured for both: Chattle (one worker) / that peer, for memory per
    held poll and time per waiter (instruments.measures.time_per_waiter). Above 1: Chattle costs more."""
    chattle = {p["requested"]: p for p in points if p["workers"] == 1}
    ratios = []
    for peer in (p for p in points if is_peer(p["workers"])):
        ours = chattle.get(peer["requested"])
        if ours is None:
            continue
        mem_ours, mem_peer = ours.get("bytes_per_poll_median"), peer.get("bytes_per_poll_median")
        tpw_ours = time_per_waiter(ours["last_delivery_s"], ours["delivered"])
        tpw_peer = time_per_waiter(peer["last_delivery_s"], peer["delivered"])
        ratios.append({
            "peer": peer["workers"], "requested": peer["requested"],
            "chattle_bytes_per_poll": mem_ours, "peer_bytes_per_poll": mem_peer,
            "memory_ratio": mem_ours / mem_peer if mem_ours and mem_peer and mem_peer > 0 else None,
            "chattle_s_per_waiter": tpw_ours, "peer_s_per_waiter": tpw_peer,
            "time_per_waiter_ratio": tpw_ours / tpw_peer if tpw_ours and tpw_peer else None,
            "chattle_us_cpu_per_delivery": cpu_per_delivery(ours["server_cpu_s"], ours["delivered"]),
            "peer_us_cpu_per_delivery": cpu_per_delivery(peer["server_cpu_s"], peer["delivered"]),
        })
    return ratios


def series_of(point):
    """A chart line: the worker count or peer of the point, or in a comparison of buses its bus."""
    return point.get("series", point["workers"])


def key_label(key):
    return key if isinstance(key, str) else "%s worker(s)" % key


def series_label(point):
    return key_label(series_of(point))


def fmt(value, pattern="%.0f", scale=1):
    return "-" if value is None else pattern % (value * scale)


def capacity(points, slo):
    """Per worker count: the largest held-poll count whose p99 stays under the SLO and
    where every poll was answered (None when even the smallest point misses it)."""
    best = {}
    for point in points:
        ok = (point["latency"]["p99"] is not None and point["latency"]["p99"] < slo
              and point["delivered"] == point["requested"])
        key = series_of(point)
        best.setdefault(key, None)
        if ok and (best[key] is None or point["requested"] > best[key]):
            best[key] = point["requested"]
    return best


# What the charts of a comparison of buses show, and how to read them (under each chart).
BUS_CAPTIONS = {
    "latency.png": "Wake-up latency after one post (kernel arrival of each answer minus the message's ts, "
                   "instruments.measures.wakeup_latency), p50 solid and p99 dashed, one line per bus, "
                   "median of the repeats by p99. On Redis and on the cluster the post goes to Redis and comes "
                   "back to every worker through its reader before any poll is answered; the one-worker "
                   "memory line has no such hop and one process answering every poll. Where the Redis and "
                   "the cluster lines lie together, the cluster's extra hop (a slot lookup, the room's master, "
                   "one reader per master in each worker) costs nothing next to the fan-out itself. Lines "
                   "marked 3 rooms: the polls spread evenly over a room on each master, one post to each.",
    "memory.png": "Memory per held poll (instruments.measures.memory_per_connection): the rise in summed RSS "
                  "of the worker processes over their idle RSS, divided by the polls held (median of repeats). "
                  "A held poll is a greenlet waiting on the worker's room, whichever bus carries the posts, so "
                  "the buses should agree; the Redis processes' memory is not in it.",
    "cpu.png": "CPU seconds of one fan-out, measured in the same run from the post to the last answer: the rig "
               "(all its client processes), the server (every worker) and the Redis nodes (`INFO cpu` of every "
               "node of the bus: the one redis-server, or the cluster's masters and replicas). The server's "
               "share is the fan-out; the Redis share is the post (one per room) and the workers' reads, "
               "small whatever the held polls, and it includes what the nodes do on their own over the window "
               "(their timers, the cluster bus's pings). The rig's CPU beside the server's shows the harness "
               "costs less than what it measures.",
}


def write_charts(report_dir, points, slo, caption_tail):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_workers = {}
    for point in points:
        by_workers.setdefault(series_of(point), []).append(point)
    compared = any("bus" in point for point in points)
    charts = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for workers, series in sorted(by_workers.items(), key=lambda kv: str(kv[0])):
        series.sort(key=lambda p: p["requested"])
        xs = [p["requested"] for p in series]
        line, = ax.plot(xs, [p["latency"]["p50"] * 1000 for p in series], marker="o",
                        label="%s p50" % key_label(workers))
        ax.plot(xs, [p["latency"]["p99"] * 1000 for p in series], marker="s", linestyle="--",
                color=line.get_color(), label="%s p99" % key_label(workers))
    ax.axhline(slo * 1000, color="#b3261e", linewidth=1, linestyle=":", label="SLO %g ms" % (slo * 1000))
    ax.set_xlabel("held polls")
    ax.set_ylabel("wake-up latency (ms)")
    ax.set_title("Wake-up latency after one post")
    ax.grid(alpha=.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(report_dir, "latency.png"), dpi=90)
    plt.close(fig)
    charts.append(("latency.png", BUS_CAPTIONS["latency.png"] + " " + caption_tail if compared else
                   "Wake-up latency (receive time minus the message's ts), p50 solid and p99 "
                   "dashed, against the number of held polls; one line per worker count, and one per "
                   "reference server (one process) when measured. " + caption_tail))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for workers, series in sorted(by_workers.items(), key=lambda kv: str(kv[0])):
        series = [p for p in series if p.get("bytes_per_poll_median") is not None]
        if series:
            ax.plot([p["requested"] for p in series], [p["bytes_per_poll_median"] / 1024 for p in series],
                    marker="o", label=key_label(workers))
    ax.set_xlabel("held polls")
    ax.set_ylabel("KiB of RSS per held poll")
    ax.set_title("Memory per held poll (rise in summed worker RSS / held polls)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(report_dir, "memory.png"), dpi=90)
    plt.close(fig)
    charts.append(("memory.png", BUS_CAPTIONS["memory.png"] + " " + caption_tail if compared else
                   "Memory per held poll: the rise in summed RSS of all worker processes "
                   "over their idle RSS, divided by the polls held (median of repeats). The kernel's part "
                   "(slab and socket buffers, both ends) is not in RSS: the table has it beside each point. "
                   + caption_tail))

    best = capacity([p for p in points if not is_peer(p["workers"])], slo)
    if compared:
        charts.append(cpu_chart(plt, report_dir, by_workers, caption_tail))
        return charts, best
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [str(w) for w in sorted(best, key=str)]
    values = [best[w] or 0 for w in sorted(best, key=str)]
    bars = ax.bar(labels, values, color="#3b6fb6")
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value, "%d" % value, ha="center", va="bottom")
    ax.set_ylim(0, max(values + [1]) * 1.15)  # room for the figures above the bars
    ax.set_xlabel("workers")
    ax.set_ylabel("held polls")
    ax.set_title("Capacity: most held polls with p99 wake-up < %g ms" % (slo * 1000))
    fig.tight_layout()
    fig.savefig(os.path.join(report_dir, "capacity.png"), dpi=90)
    plt.close(fig)
    charts.append(("capacity.png", "Capacity per worker count: the largest held-poll count measured whose "
                   "p99 wake-up latency stayed under %g ms with every poll answered (0: none did). It is a "
                   "lower bound: the sweep only tries the listed counts (`make capacity` searches the "
                   "largest). " % (slo * 1000) + caption_tail))
    return charts, best


def cpu_chart(plt, report_dir, by_series, caption_tail):
    """Per count, a group of bars per bus: the client's, the server's and Redis's CPU of one fan-out."""
    counts = sorted({p["requested"] for series in by_series.values() for p in series})
    labels = sorted(by_series, key=str)
    fig, axes = plt.subplots(1, len(counts), figsize=(4.5 * len(counts), 4.5), squeeze=False, sharey=True)
    for ax, count in zip(axes[0], counts):
        at = {label: next((p for p in by_series[label] if p["requested"] == count), {}) for label in labels}
        width = 0.27
        for offset, (field, name, colour) in enumerate((("client_cpu_s", "client (rig)", "#8c8c8c"),
                                                        ("server_cpu_s", "server", "#3b6fb6"),
                                                        ("redis_cpu_s", "Redis nodes", "#b3261e"))):
            ax.bar([i + (offset - 1) * width for i in range(len(labels))],
                   [at[label].get(field) or 0 for label in labels], width, label=name, color=colour)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([label.replace(", ", "\n") for label in labels], fontsize=8)
        ax.set_title("%d held polls" % count)
        ax.grid(alpha=.3, axis="y")
    axes[0][0].set_ylabel("CPU seconds per fan-out")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("CPU of one fan-out: client, server and Redis, per bus")
    fig.tight_layout()
    fig.savefig(os.path.join(report_dir, "cpu.png"), dpi=90)
    plt.close(fig)
    return "cpu.png", BUS_CAPTIONS["cpu.png"] + " " + caption_tail


CSV_FIELDS = ["workers", "bus", "requested", "parked", "held_confirmed", "delivered", "p50_ms", "p95_ms", "p99_ms",
              "max_ms", "last_delivery_ms", "bytes_per_poll", "server_cpu_s", "client_cpu_s", "redis_cpu_s",
              "client_lag_p99_ms", "client_bound", "repeats", "us_per_waiter", "server_us_per_delivery",
              "from_send_p50_ms", "from_send_p99_ms", "kernel_bytes_per_poll", "kernel_tcp_mem_bytes_per_poll",
              "kernel_tcp_inuse_per_poll", "kernel_slab_source"]


def csv_row(point):
    lat = point["latency"]
    from_send = point.get("latency_from_send") or {"p50": None, "p99": None}
    kernel = point.get("kernel_per_poll") or {}

    def rounded(value, digits):
        return None if value is None else round(value, digits)

    def us(value):
        return rounded(None if value is None else value * 1e6, 2)
    return {"workers": point["workers"], "bus": point.get("bus"), "requested": point["requested"],
            "parked": point["parked"],
            "held_confirmed": point["held_confirmed"], "delivered": point["delivered"],
            "p50_ms": rounded(ms(lat["p50"]), 3), "p95_ms": rounded(ms(lat["p95"]), 3),
            "p99_ms": rounded(ms(lat["p99"]), 3), "max_ms": rounded(ms(lat["max"]), 3),
            "last_delivery_ms": rounded(ms(point["last_delivery_s"]), 3),
            "bytes_per_poll": point.get("bytes_per_poll_median"),
            "server_cpu_s": point["server_cpu_s"], "client_cpu_s": point["client_cpu_s"],
            "redis_cpu_s": point.get("redis_cpu_s"), "client_lag_p99_ms": rounded(ms(point["client_lag"]["p99"]), 3),
            "client_bound": point["client_bound"], "repeats": point.get("repeats"),
            "us_per_waiter": us(time_per_waiter(point["last_delivery_s"], point["delivered"])),
            "server_us_per_delivery": rounded(cpu_per_delivery(point["server_cpu_s"], point["delivered"]), 2),
            "from_send_p50_ms": rounded(ms(from_send["p50"]), 3), "from_send_p99_ms": rounded(ms(from_send["p99"]), 3),
            "kernel_bytes_per_poll": rounded(kernel.get("slab_bytes"), 0),
            "kernel_tcp_mem_bytes_per_poll": rounded(kernel.get("tcp_mem_bytes"), 0),
            "kernel_tcp_inuse_per_poll": rounded(kernel.get("tcp_inuse"), 3),
            "kernel_slab_source": kernel.get("slab_source")}


# Defaults of the plain sweep, and of the comparison of buses (--redis-cluster): a flag given wins.
SWEEP_DEFAULTS = {"counts": "1000,2000,5000,10000,15000", "workers": "1,2,4", "peers": DEFAULT_PEERS,
                  "anatomy": 2000}
BUS_DEFAULTS = {"counts": "5000,10000", "workers": "2", "peers": "none", "anatomy": 0}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Capacity sweep: held polls x workers, wake-up latency and memory")
    parser.add_argument("--counts", help="held-poll counts, comma-separated (default %s; with --redis-cluster %s)"
                        % (SWEEP_DEFAULTS["counts"], BUS_DEFAULTS["counts"]))
    parser.add_argument("--workers", help="worker counts (default %s; with --redis-cluster %s)"
                        % (SWEEP_DEFAULTS["workers"], BUS_DEFAULTS["workers"]))
    parser.add_argument("--repeats", type=int, default=3, help="runs per point; the median is reported")
    parser.add_argument("--slo", type=float, default=0.5, help="p99 wake-up SLO in seconds (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="1k and 2k polls, 1 and 2 workers, 1 repeat")
    parser.add_argument("--target", help="measure this running server instead of starting one (URL)")
    parser.add_argument("--target-pid", type=int, action="append", default=[],
                        help="pid(s) serving --target, for RSS and CPU figures (repeatable)")
    parser.add_argument("--peers", metavar="uvloop,asyncio,nchan|1|0",
                        help="also measure these reference servers (aiohttp on uvloop, aiohttp on asyncio, nginx "
                             "with Nchan; 1: all, 0 or none: no peer) at the same counts and report the ratios "
                             "Chattle / each (default %s; none with --redis-cluster)" % DEFAULT_PEERS)
    parser.add_argument("--no-peers", dest="peers", action="store_const", const="none",
                        help="measure no reference server (--peers none)")
    parser.add_argument("--anatomy", type=int,
                        help="held polls for the per-poll memory anatomy (0 skips it; default %d, with "
                             "--redis-cluster 0)" % SWEEP_DEFAULTS["anatomy"])
    parser.add_argument("--redis-cluster", metavar="local|HOST:PORT[,...]",
                        help="compare the buses instead: the same workers on a single redis-server and on this "
                             "Redis Cluster (`local`: one of 3 masters and 3 replicas started for the run), the "
                             "polls on one room and spread over a room per master, beside one worker in memory, "
                             "in alternation at each count")
    args = parser.parse_args(argv)
    if args.redis_cluster is not None:
        if args.target:
            parser.error("--redis-cluster starts the servers it compares: it does not go with --target")
        if args.redis_cluster != bus_module.LOCAL:
            try:
                bus_module.parse_addresses(args.redis_cluster)
            except ValueError as error:
                parser.error(str(error))
    for name, value in (BUS_DEFAULTS if args.redis_cluster is not None else SWEEP_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.peer_labels = [] if args.target else peer_labels(args.peers)
    except ValueError as error:
        parser.error(str(error))
    if args.quick:
        args.counts, args.repeats = "1000,2000", 1
        if args.redis_cluster is None:
            args.workers, args.anatomy = "1,2", 1000
    return args


def say_point(name, count, repeat, point):
    lat = point["latency"]
    print("%s polls=%d repeat=%d: held %d, delivered %d, p50 %.1f ms, p99 %.1f ms, "
          "%s B/poll, server cpu %s s, client cpu %.2f s%s%s"
          % (name, count, repeat + 1, point["held_confirmed"], point["delivered"],
             (lat["p50"] or 0) * 1000, (lat["p99"] or 0) * 1000,
             "%.0f" % point["bytes_per_poll"] if point["bytes_per_poll"] else "-",
             "%.2f" % point["server_cpu_s"] if point["server_cpu_s"] is not None else "-",
             point["client_cpu_s"],
             ", redis cpu %.3f s" % point["redis_cpu_s"] if point.get("redis_cpu_s") is not None else "",
             " CLIENT-BOUND" if point["client_bound"] else ""),
          flush=True)


def measure_buses(buses, counts, repeats, log_dir):
    """Every bus at every count, in alternation (each count, each repeat, each bus), so that a
    drift of the shared machine falls on all of them alike; the median repeat of each. Each
    run also records the cores the rest of the machine kept busy meanwhile."""
    runs = {}
    for count in counts:
        for repeat in range(repeats):
            for bus in buses.all:
                began, busy, own, redis = (time.monotonic(), machine_busy_seconds(), own_cpu_seconds(),
                                           buses.redis_cpu_seconds())
                point = measure_point(bus.workers, count, None, log_dir, bus=bus)
                others = (machine_busy_seconds() - busy - (own_cpu_seconds() - own)
                          - (buses.redis_cpu_seconds() - redis))
                point["other_work_cores"] = max(0.0, others) / max(1e-6, time.monotonic() - began)
                runs.setdefault((bus.label, count), []).append(point)
                say_point(bus.label + ":", count, repeat, point)
    return [median_point(runs[(bus.label, count)]) for bus in buses.all for count in counts]


def main(argv=None):
    with CleanUp.armed():  # a SIGTERM takes Ctrl-C's way: the servers, Redis and cluster nodes started are stopped
        return sweep(argv)


def sweep(argv):
    args = parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    workers_list = [int(w) for w in args.workers.split(",")]

    # One client process holds at most PER_PROCESS sockets, but a single server process
    # holds them all: cap the counts by what its descriptor limit allows.
    limit = raise_descriptor_limit()[0] - DESCRIPTOR_MARGIN
    skipped = [c for c in counts if c > limit]
    counts = [c for c in counts if c <= limit]
    if not args.target and (any(w > 1 for w in workers_list) or args.redis_cluster is not None):
        require_or_exit(["redis-server"], "bench")  # before the report directory: none is left empty
    if NCHAN_PEER in args.peer_labels:
        require_or_exit(["nginx", "nchan"], "bench")
    report_dir = new_report_dir("bench")
    info = machine_description()
    started = time.monotonic()
    run_provenance = provenance()  # the tree as it starts: a long run outlives a commit
    load_before = os.getloadavg()
    points, redis, buses, compared = [], None, None, {}
    try:
        if args.redis_cluster is not None:
            buses = bus_module.Buses(args.redis_cluster, workers_list)
            compared = {"redis_cluster": args.redis_cluster, "cluster_address": buses.cluster_address,
                        "buses": [bus.label for bus in buses.all], "room": "bench",
                        "room_master": buses.room_home("bench"), "rooms_spread": buses.spread,
                        "cluster_nodes": ["%s:%d" % node for node in buses.all[-1].nodes]}
            print("bench: %s; room bench on the cluster's master %s"
                  % (", ".join(compared["buses"]), compared["room_master"]), flush=True)
            points = measure_buses(buses, counts, args.repeats, report_dir)
        elif args.target:
            workers_list = ["target"]
        elif any(w > 1 for w in workers_list):
            redis = RedisServer(appendonly=False)
        # The peer is one process on an in-memory store: it pairs with the one-worker points.
        measured = ([] if buses else workers_list) + args.peer_labels
        for workers in measured:
            for count in counts:
                repeats = []
                for repeat in range(args.repeats):
                    if args.target:
                        pids = args.target_pid
                        point = Rig(args.target, room="bench-%d" % os.getpid()).run(count, server_pids=pids or None)
                        point["workers"] = "target"
                    else:
                        point = measure_point(workers, count, redis.url if redis else None, report_dir)
                    repeats.append(point)
                    say_point("workers=%s" % workers, count, repeat, point)
                points.append(median_point(repeats))
    finally:
        if redis is not None:
            redis.stop()
        if buses is not None:
            buses.stop()
    load_after = os.getloadavg()

    anatomy = None
    if args.anatomy and not args.target:
        from bench import anatomy as anatomy_module
        anatomy = anatomy_module.measure(args.anatomy)

    workload = ("Workload: N polls on one room, since=cursor, timeout=60 s, one post wakes all; "
                "raw HTTP/1.1 on 127.0.0.1, client in %s process(es) of at most 8000 sockets; "
                "median of %d repeat(s); 1 worker = python chattle.py (memory bus), more = gunicorn gevent "
                "workers on a shared redis-server%s%s." % ("separate", args.repeats,
                                                            "; aiohttp reference = python -m bench.peers.aiohttp_chat, "
                                                            "one process, in memory; aiohttp on uvloop = the same "
                                                            "with --uvloop" if set(args.peer_labels) & set(PEERS)
                                                            else "", NCHAN_WORKLOAD if NCHAN_PEER in args.peer_labels
                                                            else ""))
    if args.target:
        workload = "Target %s (not started by the sweep). " % args.target + workload
    if buses:
        spread = ", ".join("%s on %s" % pair for pair in compared["rooms_spread"].items())
        workload = ("Workload: N polls on one room (bench; on the cluster it lives on the master %s), or, "
                    "on the lines marked rooms, spread evenly over one room per master (%s; on the single "
                    "Redis the same rooms), since=cursor, timeout=60 s; one post wakes all (one post per room, "
                    "one right after the other); raw HTTP/1.1 on 127.0.0.1, client in separate "
                    "process(es) of at most 8000 sockets, one per room at least; median of %d repeat(s), the "
                    "buses in alternation, a fresh server per run. Buses: %s. Redis: a redis-server started for "
                    "the run (no persistence); Redis Cluster: %s. Load average %.1f at the start, %.1f at the end."
                    % (compared["room_master"], spread, args.repeats, "; ".join(compared["buses"]),
                       "3 masters and 3 replicas on loopback started for the run (no persistence)"
                       if args.redis_cluster == bus_module.LOCAL else "the given nodes %s" % args.redis_cluster,
                       load_before[0], load_after[0]))
    caption_tail = "Machine: %s. %s" % (machine_line(info), workload)
    charts, best = write_charts(report_dir, points, args.slo, caption_tail)
    ratios = peer_ratios(points)
    results = {"peers": args.peer_labels,
               "peer_ratios": ratios,
               "machine": info, "slo_s": args.slo, "counts": counts, "skipped_counts": skipped,
               "workers": workers_list, "repeats": args.repeats, "capacity": {str(k): v for k, v in best.items()},
               "points": points, "anatomy": anatomy, "elapsed_s": time.monotonic() - started,
               "target": args.target, "load_average": {"start": load_before, "end": load_after},
               "provenance": run_provenance, **compared}
    write_json(os.path.join(report_dir, "results.json"), results)
    with open(os.path.join(report_dir, "results.csv"), "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for point in points:
            writer.writerow(csv_row(point))

    rows = [("capacity (p99 < %g ms), %s" % (args.slo * 1000, key_label(w)), best[w] if best[w] else "none", "")
            for w in sorted(best, key=str)]
    for ratio in ratios:
        rows.append(("Chattle / %s, %d polls: memory per held poll" % (ratio["peer"], ratio["requested"]),
                     "%s (%s / %s B)" % (fmt(ratio["memory_ratio"], "%.2f"), fmt(ratio["chattle_bytes_per_poll"]),
                                         fmt(ratio["peer_bytes_per_poll"])), ""))
        rows.append(("Chattle / %s, %d polls: time per waiter" % (ratio["peer"], ratio["requested"]),
                     "%s (%s / %s us)" % (fmt(ratio["time_per_waiter_ratio"], "%.2f"),
                                          fmt(ratio["chattle_s_per_waiter"], "%.1f", 1e6),
                                          fmt(ratio["peer_s_per_waiter"], "%.1f", 1e6)), ""))
        rows.append(("Chattle / %s, %d polls: server CPU per delivery" % (ratio["peer"], ratio["requested"]),
                     "%s / %s us" % (fmt(ratio["chattle_us_cpu_per_delivery"], "%.1f"),
                                     fmt(ratio["peer_us_cpu_per_delivery"], "%.1f")), ""))
    for point in points:
        row = csv_row(point)
        rows.append(("%s, %d polls" % (series_label(point), point["requested"]),
                     "p50 %s ms, p99 %s ms (from the rig's send: %s / %s ms), max %s ms, last %s ms, %s us/waiter, "
                     "%s B/poll user space + %s B/poll kernel (slab, %s; TCP buffers %s B), server CPU %s s "
                     "(%s us/delivery), client CPU %.2f s%s%s%s"
                     % (row["p50_ms"], row["p99_ms"], row["from_send_p50_ms"], row["from_send_p99_ms"], row["max_ms"],
                        row["last_delivery_ms"], row["us_per_waiter"],
                        "%.0f" % row["bytes_per_poll"] if row["bytes_per_poll"] else "-",
                        fmt(row["kernel_bytes_per_poll"]), row["kernel_slab_source"] or "-",
                        fmt(row["kernel_tcp_mem_bytes_per_poll"]),
                        "%.2f" % row["server_cpu_s"] if row["server_cpu_s"] is not None else "-",
                        fmt(row["server_us_per_delivery"], "%.1f"), row["client_cpu_s"],
                        ", Redis CPU %.3f s" % row["redis_cpu_s"] if row["redis_cpu_s"] is not None else "",
                        ", other work %.1f cores" % point["other_work_cores"] if "other_work_cores" in point else "",
                        " (client-bound)" if row["client_bound"] else ""),
                     "fail" if row["delivered"] != row["requested"] else ""))
    notes = [] if not ratios else [
        "Ratios Chattle / each reference server: memory per held poll is the rise in server RSS per held "
        "poll; time per waiter is the time from the post to the last answer received, divided by the "
        "waiters answered (instruments.measures.time_per_waiter). Both servers are one process on an "
        "in-memory store, measured by the same rig at the same count; above 1 Chattle costs more."]
    if buses:
        notes.append("Other work: the cores the rest of the machine kept busy during a run (/proc/stat less this "
                     "sweep, its servers, clients and Redis nodes); above a few tenths of the %d cores the "
                     "latencies include waiting for a core." % os.cpu_count())
    notes.append("Kernel memory per held poll (instruments.measures.kernel_memory): the rise of the machine's slab "
                 "caches (/proc/slabinfo, or /proc/meminfo's Slab where it cannot be read: the row names which) and "
                 "of /proc/net/sockstat's TCP buffer pages from before the polls were parked to while they are held, "
                 "over the polls held. It counts both ends of each loopback connection (the client's socket and the "
                 "server's), and anything else the machine did meanwhile; user-space RSS beside it is the server's "
                 "alone.")
    notes.append("p50/p99 from the rig's send: the same answers timed from just before the rig sent the post "
                 "(Nchan's latency origin: it stamps no message), beside the server's own `ts` (Chattle's and the "
                 "aiohttp peers' origin, when the server accepted the post); for Nchan both are the send time.")
    notes.append("A point is marked client-bound when the rig's own lag (an answer's kernel arrival to its read) "
                 "at p99 exceeds a tenth of the wake-up p99 and 10 ms (instruments.measures.client_bound, the "
                 "load test's rule): the rig then fell behind the server it measures.")
    if skipped:
        notes.append("Skipped counts over the descriptor limit (%d): %s" % (limit, skipped))
    if anatomy:
        rows.append(("anatomy: held polls", anatomy["held"], ""))
        rows.append(("anatomy: RSS per held poll (under tracemalloc, includes its bookkeeping)",
                     "%.0f B" % anatomy["rss_per_poll"], ""))
        rows.append(("anatomy: traced Python allocations per poll", "%.0f B" % anatomy["traced_per_poll"], ""))
        rows.append(("anatomy: greenlets per poll / saved stack per poll",
                     "%.2f / %s" % (anatomy["greenlets_per_poll"], anatomy.get("stack_note", "")), ""))
        rows.append(("anatomy: socket buffers (kernel, not in RSS)",
                     "SO_RCVBUF %s B, SO_SNDBUF %s B per server socket (reserved when data queues); "
                     "kernel TCP memory %.0f B per poll (system-wide, blurred by other processes)"
                     % (anatomy["so_rcvbuf"], anatomy["so_sndbuf"], anatomy["kernel_tcp_per_poll"]), ""))
        for site in anatomy["top_sites"][:12]:
            rows.append(("  %s" % site["site"], "%.0f B/poll (%d blocks total)"
                         % (site["bytes_per_poll"], site["count"]), ""))
    write_html(os.path.join(report_dir, "report.html"),
               "Chattle capacity sweep" + (": the buses side by side" if buses else ""),
               caption_tail, rows, charts, notes=notes,
               links=[("results.json", "results.json"), ("results.csv", "results.csv")])
    for ratio in ratios:
        print("Chattle / %s at %d polls: memory per held poll %s, time per waiter %s"
              % (ratio["peer"], ratio["requested"], fmt(ratio["memory_ratio"], "%.2f"),
                 fmt(ratio["time_per_waiter_ratio"], "%.2f")))
    print("capacity (p99 < %g ms): %s" % (args.slo * 1000, "; ".join("%s: %s" % (key_label(w), best[w])
                                                                     for w in sorted(best, key=str))))
    print("report: %s (%.0f s)" % (os.path.join(report_dir, "report.html"), time.monotonic() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
