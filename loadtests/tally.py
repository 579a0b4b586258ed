"""What the load processes saw, and how it travels to the master.

Each Locust worker keeps a `WorkerTally`: latency and client-lag histograms per second
of arrival (3 significant digits; the run's are their sum), every ended listener's
delivery ledger, every accepted post, the errors. Every Locust report (`events.report_to_master`, each 3 s)
and the custom message a worker sends at once when its last listener has ended carry
what is new since the last one; the master adds the reports up in a `RunTally` (`events.worker_report`) and writes
it to `raw/run.json` for the report. Nothing goes through a shared disk, so the workers
may run on other hosts.

No Locust import here: the report reads `RunTally` back without starting Locust.
"""

import itertools
import json
import os
import socket
import time

from instruments.measures import DeliveryLedger, LatencyHistogram, client_lag, process_cpu_seconds, wakeup_latency

ERRORS_KEPT = 200           # examples kept per process; every error is counted
LOCUST_VERSION = [None]     # set by the locustfile: the report reads tallies without Locust


class WorkerTally:
    """One load process's figures since its last report."""

    def __init__(self):
        self.reports = itertools.count(1)
        self.cpu_at_start = 0.0     # CPU seconds at test start: imports and start-up are not load
        self.listeners_started = 0
        self.listeners_ended = 0
        self.deliveries = 0
        self.unstamped = 0          # answers without a kernel timestamp: their lag counts as latency
        self.under_bound = 0        # latencies shorter than the clock offset's bound: not measurable
        self.clocks = None          # Clocks.to_dict(): offsets to each server, sent with every report
        self.held_path = None       # "compiled" or "python": how this process reads held polls
        self.fatal = None           # why this process cannot go on (its held-poll driver died)
        self._reset()

    def _reset(self):
        self.seconds = {}
        self.ended = []
        self.posts = []
        self.refusals = []
        self.errors = []
        self.error_count = 0

    # -- recording (listeners and posters call these) ------------------------------------

    def delivery(self, arrived_at, read_at, message_ts, stamped=True, offset=0.0, bound=0.0):
        """One message a held poll brought: its wake-up latency and the client's lag, filed
        under the second it arrived in on the server's clock (two dict counts; see
        LatencyHistogram.record). `offset` (this host's clock minus the server's) corrects
        the latency; one shorter than the offset's `bound` is counted as under the bound
        and recorded as the bound, never as a negative number."""
        if not stamped:
            self.unstamped += 1
        arrived_on_server_clock = arrived_at - offset
        second = int(arrived_on_server_clock)
        pair = self.seconds.get(second)
        if pair is None:
            pair = self.seconds[second] = (LatencyHistogram(), LatencyHistogram())
        latency = wakeup_latency(arrived_on_server_clock, message_ts)
        if latency < bound:
            self.under_bound += 1
            latency = bound
        pair[0].record(latency)
        pair[1].record(client_lag(read_at, arrived_at))
        self.deliveries += 1

    def delivery_batch(self, arrived_at, read_at, message_ts, stamped, offset, bound):
        """`delivery` for each answer of a batch that brought the message stamped
        `message_ts`: numpy arrays of one value per answer (stamped: booleans), from the
        compiled held-poll path. tests/harness/test_load_client.py holds the two to the same figures."""
        import numpy
        count = len(arrived_at)
        self.unstamped += count - int(stamped.sum())
        arrived_on_server_clock = arrived_at - offset
        latency = wakeup_latency(arrived_on_server_clock, message_ts)
        under = latency < bound
        self.under_bound += int(under.sum())
        latency = numpy.where(under, bound, latency)
        lag = client_lag(read_at, arrived_at)
        seconds = arrived_on_server_clock.astype(numpy.int64)
        for second in numpy.unique(seconds).tolist():
            pair = self.seconds.get(second)
            if pair is None:
                pair = self.seconds[second] = (LatencyHistogram(), LatencyHistogram())
            in_second = seconds == second
            pair[0].record_many(latency[in_second])
            pair[1].record_many(lag[in_second])
        self.deliveries += count

    def test_started(self):
        self.cpu_at_start = process_cpu_seconds(os.getpid())

    def listener_started(self):
        self.listeners_started += 1

    def listener_ended(self, summary):
        """`summary`: listener, room, ledger (DeliveryLedger.to_dict), polls, caught_up, gave_up."""
        self.listeners_ended += 1
        self.ended.append(summary)

    def post(self, room, message_id, ts, epoch=None):
        """An accepted post: [room, id, ts, epoch] (epoch None when the server names no history)."""
        self.posts.append([room, message_id, ts, epoch])

    def refused(self, room, status, outcome_unknown):
        """A post not accepted: [when, room, status (None: no answer), outcome unknown]."""
        self.refusals.append([time.time(), room, status, outcome_unknown])

    def error(self, who, what):
        self.error_count += 1
        if len(self.errors) < ERRORS_KEPT:
            self.errors.append([time.time(), who, what])

    @property
    def live_listeners(self):
        return self.listeners_started - self.listeners_ended

    # -- the report ------------------------------------------------------------------------

    def take_report(self, final=False):
        """What is new since the last report, msgpack-safe; per-second histograms of
        seconds still running stay until a later report (all of them in a final one)."""
        now = int(time.time())
        done = [second for second in self.seconds if final or second < now]
        report = {
            "sequence": next(self.reports), "final": final, "host": socket.gethostname(), "pid": os.getpid(),
            "cpu_seconds": process_cpu_seconds(os.getpid()) - self.cpu_at_start,
            "listeners_started": self.listeners_started, "listeners_ended": self.listeners_ended,
            "deliveries": self.deliveries, "unstamped": self.unstamped, "under_bound": self.under_bound,
            "clocks": self.clocks, "locust_version": LOCUST_VERSION[0], "held_path": self.held_path,
            "fatal": self.fatal,
            "seconds": [[second, self.seconds[second][0].to_dict(), self.seconds[second][1].to_dict()]
                        for second in done],
            "ended": self.ended, "posts": self.posts, "refusals": self.refusals, "errors": self.errors,
            "error_count": self.error_count,
        }
        kept = {second: self.seconds[second] for second in self.seconds if second not in set(done)}
        self._reset()
        self.seconds = kept
        return report


class RunTally:
    """The whole run, added up from every worker's reports (on the master)."""

    def __init__(self, locust_version=None):
        """`locust_version`: the master's; a worker reporting another one sets version_problem."""
        self.locust_version = locust_version
        self.latency = LatencyHistogram()
        self.lag = LatencyHistogram()
        self.seconds = {}
        self.listeners = []
        self.posts = []
        self.refusals = []
        self.errors = []
        self.error_count = 0
        self.workers = {}
        self.worker_latency = {}    # worker id -> its own LatencyHistogram (clocks compared per host)
        self.worker_lag = {}        # worker id -> its own client-lag LatencyHistogram (which host fell behind)
        self.master = None          # host, pid and CPU seconds of the master, set when it writes
        self.version_problem = None  # a worker on another Locust version: the run was stopped
        self.fatal = None           # a worker that could not go on (its held-poll driver died): the run was stopped
        self.shape_started = None   # wall-clock time of the shape's 0 s: the stages' clock, the report's origin

    def merge(self, worker_id, report):
        worker = self.workers.setdefault(worker_id, {"host": report["host"], "pid": report["pid"], "reports": 0,
                                                     "final": False, "last_report_at": None})
        worker.update(reports=worker["reports"] + 1, last_report_at=time.time(), cpu_seconds=report["cpu_seconds"],
                      listeners_started=report["listeners_started"], listeners_ended=report["listeners_ended"],
                      deliveries=report["deliveries"], unstamped=report.get("unstamped", 0),
                      under_bound=report.get("under_bound", 0), clocks=report.get("clocks"),
                      locust_version=report.get("locust_version"), held_path=report.get("held_path"), lost=False,
                      final=worker["final"] or report["final"])
        if self.locust_version and report.get("locust_version") != self.locust_version \
                and self.version_problem is None:
            # Locust itself only warns; a worker of another version may count and report
            # differently, so the run is stopped and the report says why.
            self.version_problem = ("load worker %s on %s runs Locust %s, the master runs %s: install the same "
                                    "version on every load host" % (worker_id, report["host"],
                                                                    report.get("locust_version"), self.locust_version))
        if report.get("fatal") and self.fatal is None:
            self.fatal = "load worker %s on %s: %s" % (worker_id, report["host"], report["fatal"])
        own = self.worker_latency.setdefault(worker_id, LatencyHistogram())
        own_lag = self.worker_lag.setdefault(worker_id, LatencyHistogram())
        for second, latency, lag in report["seconds"]:
            latency, lag = LatencyHistogram.from_dict(latency), LatencyHistogram.from_dict(lag)
            own.add(latency)
            own_lag.add(lag)
            pair = self.seconds.get(second)
            if pair is None:
                pair = self.seconds[second] = (LatencyHistogram(), LatencyHistogram())
            pair[0].add(latency)
            pair[1].add(lag)
            self.latency.add(latency)
            self.lag.add(lag)
        for summary in report["ended"]:
            self.listeners.append(dict(summary, worker=worker_id))
        self.posts.extend(report["posts"])
        self.refusals.extend(report.get("refusals", ()))
        room = ERRORS_KEPT * max(1, len(self.workers)) - len(self.errors)
        self.errors.extend(report["errors"][:max(0, room)])
        self.error_count += report["error_count"]

    def drained(self, connected=None):
        """Every worker has reported, and every listener it started has ended (caught up or
        gave up). A worker not among `connected` (ids the master still hears) is marked
        lost: its listeners without a ledger count as lost contact, and nobody waits on it."""
        if connected is not None:
            for worker_id, worker in self.workers.items():
                if worker_id not in connected and not worker["final"]:
                    worker["lost"] = True
        return bool(self.workers) and all(worker["listeners_started"] == worker["listeners_ended"]
                                          or worker.get("lost") for worker in self.workers.values())

    def ledgers(self):
        """[(listener summary, its DeliveryLedger or None)]: a listener stopped before its
        first answer never had a cursor, so it has no ledger, only a reason it gave up."""
        return [(entry, DeliveryLedger.from_dict(entry["ledger"]) if entry["ledger"] is not None else None)
                for entry in self.listeners]

    # -- to and from raw/run.json ----------------------------------------------------------

    def to_dict(self):
        # Each worker's own latency figures are summed up here, once, not per report, and
        # without a mean: HdrHistogram's mean walks every bucket in Python (half the
        # master's CPU when it was done per report).
        for figure, histograms in (("latency", self.worker_latency), ("lag", self.worker_lag)):
            for worker_id, own in histograms.items():
                self.workers[worker_id][figure] = {"count": own.count, "p50": own.percentile(0.50),
                                                   "p99": own.percentile(0.99)}
        return {"seconds": [[second, pair[0].to_dict(), pair[1].to_dict()]
                            for second, pair in sorted(self.seconds.items())],
                "listeners": self.listeners, "posts": self.posts, "refusals": self.refusals, "errors": self.errors,
                "error_count": self.error_count, "workers": self.workers,
                "master": self.master, "version_problem": self.version_problem, "fatal": self.fatal,
                "shape_started": self.shape_started}

    @classmethod
    def from_dict(cls, data):
        tally = cls()
        tally.seconds = {second: (LatencyHistogram.from_dict(latency), LatencyHistogram.from_dict(lag))
                         for second, latency, lag in data["seconds"]}
        for latency, lag in tally.seconds.values():
            tally.latency.add(latency)
            tally.lag.add(lag)
        tally.listeners, tally.posts = data["listeners"], data["posts"]
        tally.refusals = data.get("refusals", [])
        tally.errors, tally.error_count, tally.workers = data["errors"], data["error_count"], data["workers"]
        tally.master = data.get("master")
        tally.version_problem = data.get("version_problem")
        tally.fatal = data.get("fatal")
        tally.shape_started = data.get("shape_started")
        return tally

    def write(self, path):
        with open(path + ".tmp", "w") as out:
            json.dump(self.to_dict(), out)
        os.replace(path + ".tmp", path)

    @classmethod
    def read(cls, path):
        with open(path) as raw:
            return cls.from_dict(json.load(raw))
