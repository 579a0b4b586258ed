"""/metrics: what /stats says of a worker, in the Prometheus text format, summed over every
worker of a gunicorn master.

Nothing is counted for it: the figures are the ones /stats reads (chattle.worker_figures),
read when a scrape asks. A gunicorn master's workers share one listening socket, so a scrape
reaches one of them; for the others it reads what each wrote of itself into a folder they
share (CHATTLE_METRICS_DIR, made by gunicorn.conf.py): every worker writes its figures there
once a SNAPSHOT_EVERY, from a greenlet of its own, whoever scrapes. That costs each worker
the same whatever the scrape rate, and a scrape never waits on a worker busy with a fan-out,
at the price of a sibling's figures being up to SNAPSHOT_EVERY old. Descriptors and memory,
which the kernel knows, are read from /proc at the scrape, fresh.

Worker restarts: a worker that is gone no longer counts in the gauges (held polls,
connections: its clients are gone with it), while its counters stay in the sums, so that
every counter only grows, as Prometheus's rate() expects. The folder's `retired.json` holds
the counters of every worker gone, folded in by the master as each one exits (child_exit),
or by a scrape that finds a worker's file and no such process. A worker that stops
gracefully writes its figures as it exits; one killed outright loses what it counted since
its last write.

Bounded: the folder holds one file per live worker and one for the retired; a rendered page
is kept RENDER_EVERY, so scrapes in a hurry cost no more than one render per that time.
"""

import fcntl
import json
import os
import sys
import time

import gevent

# prometheus_client is imported at the first scrape, not with the server: a server nobody
# scrapes keeps its heap as it was, and so what its garbage collector walks.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes (a test checks it)
DIRECTORY_VARIABLE = "CHATTLE_METRICS_DIR"
SNAPSHOT_EVERY = 1.0    # seconds between a worker's writes of its figures
RENDER_EVERY = 0.25     # seconds a rendered page answers every scrape
MAX_SNAPSHOT_BYTES = 256 * 1024
RETIRED = "retired.json"
LOCK = "lock"
PREFIX = "worker-"

# (metric, the /stats figure it is, Prometheus type, help); a counter's name gets _total.
FIGURES = (
    ("chattle_held_polls", "waiters", "gauge", "Polls held now, parked until a post or their timeout."),
    ("chattle_connections", "connections", "gauge", "Client connections open now."),
    ("chattle_descriptors", "descriptors", "gauge", "Open file descriptors of the workers."),
    ("chattle_rooms", "rooms", "gauge", "Rooms the workers hold (each worker counts its own copies)."),
    ("chattle_retained_messages", "messages", "gauge", "Messages the workers retain."),
    ("chattle_retained_bytes", "retained_bytes", "gauge", "Bytes of messages and rooms counted against "
     "--max-retained-bytes."),
    ("chattle_answer_cache_bytes", "answer_cache_bytes", "gauge", "Bytes of encoded poll answers cached."),
    ("chattle_unsent_bytes", "unsent_bytes", "gauge", "Bytes of answers held for clients still taking them."),
    ("chattle_rss_bytes", "rss_bytes", "gauge", "Resident memory of the workers."),
    ("chattle_deliveries", "deliveries", "counter", "Held polls woken by a post (those held on its room "
     "when it arrived)."),
    ("chattle_posts", "posts", "counter", "Posts written (not those an Idempotency-Key answered again)."),
    ("chattle_answers_encoded", "encodes", "counter", "Poll answers encoded (a fan-out on one cursor "
     "encodes one)."),
    ("chattle_rooms_forgotten", "rooms_forgotten", "counter", "Rooms with a history forgotten at a bound."),
    ("chattle_bus_posts_received", "bus_posts_received", "counter", "Posts the shared bus's readers were given."),
    ("chattle_bus_posts_received_for_rooms_not_held", "bus_posts_received_for_rooms_not_held", "counter",
     "Of those, posts for rooms the worker holds no copy of."),
    ("chattle_unsent_dropped", "unsent_dropped", "counter", "Connections dropped to keep the unsent answers "
     "within --max-unsent-bytes."),
)
# bus_reader's counters, each chattle_bus_reader_<name>_total
READER_COUNTERS = ("restarts", "reconnects", "malformed_entries", "resyncs")
PROC_FIGURES = ("descriptors", "rss_bytes")  # read from /proc at the scrape for the other workers


def metric_names():
    """Every metric family /metrics may give (docs/deploy.md lists them; a test checks it)."""
    names = ["chattle_workers"]
    names += [name + ("_total" if kind == "counter" else "") for name, _figure, kind, _help in FIGURES]
    names += ["chattle_refusals_total", "chattle_fan_out_seconds", "chattle_bus_reader_workers",
              "chattle_bus_reader_lag_seconds"]
    names += ["chattle_bus_reader_%s_total" % name for name in READER_COUNTERS]
    return names


###############################################################################
# Sums over workers
###############################################################################

def counters_of(figures):
    """The figures of one worker that only grow, which outlive it."""
    reader = figures.get("bus_reader") or {}
    return {"counters": {figure: figures.get(figure) or 0 for _name, figure, kind, _help in FIGURES
                         if kind == "counter"},
            "refusals": dict(figures.get("refusals") or {}),
            "reader": {name: reader.get(name) or 0 for name in READER_COUNTERS},
            "fan_out_seconds": figures.get("fan_out_seconds") or {"buckets": [], "count": 0, "sum": 0.0}}


def add_counters(total, more):
    """`total` and `more` (each as counters_of gives) added, as a new dict."""
    summed = counters_of({})
    for part in ("counters", "refusals", "reader"):
        for source in (total, more):
            for key, value in source.get(part, {}).items():
                summed[part][key] = summed[part].get(key, 0) + value
    buckets = {}
    for source in (total, more):
        for bound, count in source.get("fan_out_seconds", {}).get("buckets", []):
            buckets[bound] = buckets.get(bound, 0) + count
        summed["fan_out_seconds"]["count"] += source.get("fan_out_seconds", {}).get("count", 0)
        summed["fan_out_seconds"]["sum"] += source.get("fan_out_seconds", {}).get("sum", 0.0)
    summed["fan_out_seconds"]["buckets"] = sorted([bound, count] for bound, count in buckets.items())
    return summed


def families(live, retired):
    """The metric families of the live workers' figures (a list of /stats dicts) and the
    counters of the workers gone (`retired`, as counters_of gives)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    counted = retired
    for figures in live:
        counted = add_counters(counted, counters_of(figures))
    buses = sorted({figures.get("bus") or "unknown" for figures in live})
    workers = GaugeMetricFamily("chattle_workers", "Workers serving now, by bus.", labels=["bus"])
    for bus in buses:
        workers.add_metric([bus], sum(1 for figures in live if (figures.get("bus") or "unknown") == bus))
    yield workers
    for name, figure, kind, help_text in FIGURES:
        if kind == "counter":
            yield CounterMetricFamily(name, help_text, value=counted["counters"].get(figure, 0))
        else:
            yield GaugeMetricFamily(name, help_text, value=sum(figures.get(figure) or 0 for figures in live))
    refused = CounterMetricFamily("chattle_refusals", "Requests refused, by reason.", labels=["reason"])
    for reason, count in sorted(counted["refusals"].items()):
        refused.add_metric([reason], count)
    yield refused
    fan_outs = counted["fan_out_seconds"]
    yield HistogramMetricFamily(
        "chattle_fan_out_seconds", "Seconds from a post reaching a room with held polls until every one "
        "of them was answered.",
        buckets=[(repr(float(bound)), count) for bound, count in fan_outs["buckets"]]
        + [("+Inf", fan_outs["count"])], sum_value=fan_outs["sum"])
    states = GaugeMetricFamily("chattle_bus_reader_workers", "Workers whose shared-bus reader is in each state.",
                               labels=["state"])
    by_worker = [(figures.get("bus_reader") or {}).get("state") for figures in live]
    for state in sorted(set(by_worker) - {None}):
        states.add_metric([state], by_worker.count(state))
    yield states
    lags = [figures["bus_reader_lag_seconds"] for figures in live if figures.get("bus_reader_lag_seconds") is not None]
    lag = GaugeMetricFamily("chattle_bus_reader_lag_seconds", "The longest any worker's reader has left the "
                            "oldest post it has not applied yet waiting.")
    if lags:
        lag.add_metric([], max(lags))
    yield lag
    for name in READER_COUNTERS:
        yield CounterMetricFamily("chattle_bus_reader_%s" % name, "Shared-bus reader %s, over every worker."
                                  % name.replace("_", " "), value=counted["reader"].get(name, 0))


class Figures:
    """A prometheus_client collector of families(): read when the page is rendered."""

    def __init__(self, read):
        self.read = read  # () -> (live workers' figures, retired counters)

    def collect(self):
        return families(*self.read())


###############################################################################
# The folder the workers of one master share
###############################################################################

def process_start(pid):
    """The process's start time in clock ticks since boot, or None when there is none: a
    pid the kernel gave again to another process has another."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def proc_figures(pid):
    """What /stats reads from /proc for itself, read for another process."""
    figures = {}
    try:
        figures["descriptors"] = len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        figures["descriptors"] = None
    try:
        with open("/proc/%d/statm" % pid) as statm:
            figures["rss_bytes"] = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        figures["rss_bytes"] = None
    return figures


def snapshot_path(directory, pid):
    return os.path.join(directory, "%s%d.json" % (PREFIX, pid))


def read_json(path):
    try:
        with open(path, "rb") as source:
            data = source.read(MAX_SNAPSHOT_BYTES + 1)
        return json.loads(data) if len(data) <= MAX_SNAPSHOT_BYTES else None
    except (OSError, ValueError):
        return None


def write_json(path, value):
    """Whole or not at all: a reader never finds half a file."""
    temporary = "%s.%d.tmp" % (path, os.getpid())
    with open(temporary, "w") as target:
        json.dump(value, target)
    os.replace(temporary, path)


class Locked:
    """The folder's lock, so that a gone worker's counters are folded in once."""

    def __init__(self, directory):
        self.path = os.path.join(directory, LOCK)

    def __enter__(self):
        self.file = open(self.path, "a")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *_exc):
        self.file.close()  # releases the lock


def write_snapshot(directory, figures):
    pid = os.getpid()
    kept = {key: value for key, value in figures.items() if key not in PROC_FIGURES}
    kept.update(pid=pid, started=process_start(pid), written=time.time())
    write_json(snapshot_path(directory, pid), kept)


def retire(directory, pid):
    """Fold the counters of worker `pid`, gone, into the retired ones, and forget its file.
    Called by the master as the worker exits, and by a scrape that finds it gone."""
    with Locked(directory):
        fold(directory, pid)


def fold(directory, pid):
    path = snapshot_path(directory, pid)
    figures = read_json(path)
    if figures is None:
        return
    retired_path = os.path.join(directory, RETIRED)
    write_json(retired_path, add_counters(read_json(retired_path) or counters_of({}), counters_of(figures)))
    os.unlink(path)


def gather(directory, own_figures):
    """(every live worker's figures, this one's read now; the retired counters)."""
    own = os.getpid()
    live = [own_figures]
    with Locked(directory):
        for name in sorted(os.listdir(directory)):
            if not (name.startswith(PREFIX) and name.endswith(".json")) or not name[len(PREFIX):-5].isdigit():
                continue
            pid = int(name[len(PREFIX):-5])
            if pid == own:
                continue
            figures = read_json(os.path.join(directory, name))
            if figures is None:
                continue
            started = process_start(pid)
            if started is None or started != figures.get("started"):  # gone, or its pid given again
                fold(directory, pid)
                continue
            figures.update(proc_figures(pid))
            live.append(figures)
        retired = read_json(os.path.join(directory, RETIRED)) or counters_of({})
    return live, retired


def prepare(directory):
    """A master's folder, before its workers start: none of an earlier master's figures."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.startswith(PREFIX) or name in (RETIRED, LOCK):
            os.unlink(os.path.join(directory, name))


###############################################################################
# In a worker
###############################################################################

_shared = {"directory": None}
_rendered = {"at": None, "body": b""}


def share_through(directory, figures, every=SNAPSHOT_EVERY):
    """Write this worker's figures() into `directory` now and every `every` seconds, from a
    greenlet; scrapes then sum every worker writing there."""
    _shared["directory"] = directory

    def write_now():
        try:
            write_snapshot(directory, figures())
        except Exception as error:  # noqa: BLE001  (monitoring must never stop or end a worker)
            print("chattle: /metrics could not write this worker's figures (%s: %s); the next write "
                  "tries again" % (type(error).__name__, error), file=sys.stderr)

    def keep_writing():
        while True:
            gevent.sleep(every)
            write_now()

    write_now()

    return gevent.spawn(keep_writing)


def final_snapshot(figures):
    """As a worker exits gracefully: what it counted since its last write is kept."""
    if _shared["directory"] is not None:
        write_snapshot(_shared["directory"], figures())


def exposition(figures):
    """The page /metrics answers: this worker's figures() read now, and every other worker's
    of the shared folder, if any; rendered once per RENDER_EVERY at most."""
    now = time.monotonic()
    if _rendered["at"] is not None and now - _rendered["at"] < RENDER_EVERY:
        return _rendered["body"]
    directory = _shared["directory"]

    def read():
        own = figures()
        if directory is None:
            return [own], counters_of({})
        return gather(directory, own)

    from prometheus_client import CollectorRegistry, generate_latest
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Figures(read))
    _rendered["at"], _rendered["body"] = now, generate_latest(registry)
    return _rendered["body"]
