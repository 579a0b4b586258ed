"""The one definition of each figure Chattle reports.

loadtests/, bench/ and the tests all compute wake-up latency, delivery
completeness and memory per held connection through these functions, so a number in
a load report and the same number in a capacity sweep mean the same thing.
"""

import functools
import math
import os
import random

# -- wake-up latency -----------------------------------------------------------------

def wakeup_latency(arrived_at, message_ts):
    """Seconds from the server accepting a post (its `ts`) to the answer carrying it
    reaching the listener's host.

    `arrived_at` is best the kernel's receive timestamp of the answer (SO_TIMESTAMPNS):
    then a busy client, slow to read, does not show up as a slow server. Where only the
    read time is known (the bench rig reads at once, so the two agree), pass that. Both
    are wall-clock times on this machine (client and server share its clock on loopback).
    """
    return arrived_at - message_ts


def ms(seconds, pattern=None):
    """`seconds` in milliseconds, None for None; with `pattern` ("%.1f"), as that text, "-"
    for None. Every latency is kept in seconds and shown in milliseconds."""
    if seconds is None:
        return None if pattern is None else "-"
    return seconds * 1000 if pattern is None else pattern % (seconds * 1000)


def client_lag(read_at, arrived_at):
    """Seconds an answer sat in the client host's socket buffer before the client read
    it: the load generator's own queueing, reported apart from the server's latency."""
    return read_at - arrived_at


CLIENT_LAG_SHARE = 0.10   # client lag p99 above this share of the server's wake-up p99 ...
CLIENT_LAG_FLOOR = 0.010  # ... and above this many seconds: the run is client-bound


def client_bound(lag_p99, wakeup_p99, floor=CLIENT_LAG_FLOOR):
    """Whether the client's own lag is a material part of what a run measured.

    Wake-up latency ends at the kernel's arrival stamp, so the client's lag never enters
    it; lag matters when the client falls so far behind that its re-polls come back late
    and the server meets a different load than the one asked for. A tenth of the
    server's p99 is that mark, with a floor: a few milliseconds of lag are a shared core's
    scheduling and the driver's 1 ms read pauses, which would fail every small fan-out
    (a 20 ms p99 of 100-listener rooms) while changing nothing the server does."""
    if lag_p99 is None or not wakeup_p99:
        return False
    return lag_p99 > max(CLIENT_LAG_SHARE * wakeup_p99, floor)


def percentile(sorted_values, fraction):
    """Linear interpolation between closest ranks (numpy's default), on sorted input."""
    if not sorted_values:
        return float("nan")
    position = (len(sorted_values) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


LATENCY_HIGHEST_US = 3600 * 10 ** 6    # an hour: far beyond any poll's life
LATENCY_DIGITS = 3                     # 0.1 % resolution at every magnitude, from 1 us
SIGNIFICANT_BITS = 11                  # HdrHistogram's sub-buckets at 3 digits: 2048 = 2 ** 11


class LatencyHistogram:
    """Latencies in microseconds, in an HdrHistogram: fixed memory whatever the count,
    3 significant digits from 1 us to an hour, and mergeable, so each load process
    ships its deltas to the master and the master adds them up.

    `record` is on the load generator's hot path (two per delivery), and HdrHistogram's
    own record_value costs about 1.2 us in Python. So values are first counted in a dict
    by the very bucket HdrHistogram would put them in (the top 11 significant bits: 2048
    sub-buckets, its 3-digit resolution), and moved into the HdrHistogram in one go when
    a figure is read or the histogram travels. tests/harness/test_load_client.py checks that the
    two agree bucket for bucket.

    A value below 1 us (a clock step, or two clocks that disagree) is counted in
    `below_resolution` and recorded as 1 us, never as a negative number.
    """

    __slots__ = ("_histogram", "_pending", "below_resolution", "digits")

    def __init__(self, digits=LATENCY_DIGITS):
        self.digits = digits
        self._histogram = None
        self._pending = {}
        self.below_resolution = 0

    def record(self, seconds):
        microseconds = int(seconds * 1e6 + 0.5)
        if microseconds < 1:
            self.below_resolution += 1
            microseconds = 1
        elif microseconds > LATENCY_HIGHEST_US:
            microseconds = LATENCY_HIGHEST_US
        shift = microseconds.bit_length() - SIGNIFICANT_BITS
        if shift > 0:
            microseconds = microseconds >> shift << shift
        pending = self._pending
        pending[microseconds] = pending.get(microseconds, 0) + 1

    def record_many(self, seconds):
        """`record` for each value of a numpy array, in a few array operations: the load
        generator's compiled held-poll path (loadtests/_heldfast.c) hands its answers over
        a batch at a time. tests/harness/test_load_client.py checks it against `record`."""
        import numpy
        microseconds = (seconds * 1e6 + 0.5).astype(numpy.int64)  # truncates, as int() does
        below = microseconds < 1
        self.below_resolution += int(below.sum())
        numpy.clip(microseconds, 1, LATENCY_HIGHEST_US, out=microseconds)
        # frexp's exponent of a whole number under 2 ** 53 is its bit_length
        shift = numpy.maximum(numpy.frexp(microseconds.astype(numpy.float64))[1] - SIGNIFICANT_BITS, 0)
        values, counts = numpy.unique(microseconds >> shift << shift, return_counts=True)
        pending = self._pending
        for value, count in zip(values.tolist(), counts.tolist()):
            pending[value] = pending.get(value, 0) + count

    @property
    def _hdr(self):
        """The HdrHistogram, with every pending value moved in."""
        if self._histogram is None:
            from hdrh.histogram import HdrHistogram
            self._histogram = HdrHistogram(1, LATENCY_HIGHEST_US, self.digits)
        if self._pending:
            _record_counted(self._histogram, self._pending)
            self._pending = {}
        return self._histogram

    @property
    def count(self):
        return self._hdr.get_total_count()

    def add(self, other):
        if other.count:
            self._hdr.add(other._hdr)
        self.below_resolution += other.below_resolution
        return self

    def percentile(self, fraction):
        """Seconds at or below which `fraction` of the values lie (None when empty)."""
        if not self.count:
            return None
        return self._hdr.get_value_at_percentile(fraction * 100.0) / 1e6

    def summary(self):
        """count, p50, p95, p99, max and mean, in seconds: the figures every report prints."""
        histogram = self._hdr
        if not histogram.get_total_count():
            return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None,
                    "below_resolution": self.below_resolution}
        return {"count": histogram.get_total_count(), "p50": self.percentile(0.50), "p95": self.percentile(0.95),
                "p99": self.percentile(0.99), "max": histogram.get_max_value() / 1e6,
                "mean": histogram.get_mean_value() / 1e6, "below_resolution": self.below_resolution}

    def to_dict(self):
        """A compact, JSON- and msgpack-safe form (HdrHistogram's own compressed encoding)."""
        return {"hdr": self._hdr.encode().decode("ascii") if self.count else None, "digits": self.digits,
                "below_resolution": self.below_resolution}

    @classmethod
    def from_dict(cls, data):
        from hdrh.histogram import HdrHistogram
        histogram = cls(data.get("digits", LATENCY_DIGITS))
        if data.get("hdr"):
            histogram._hdr.add(HdrHistogram.decode(data["hdr"].encode("ascii")))
        histogram.below_resolution = data.get("below_resolution", 0)
        return histogram

    def buckets(self):
        """[(upper edge in seconds, count)] of the non-empty buckets, for histogram charts."""
        return [(item.value_iterated_to / 1e6, item.count_at_value_iterated_to)
                for item in self._hdr.get_recorded_iterator()]


def _record_counted(histogram, counted):
    """HdrHistogram's record_value(value, count) for each item of `counted`, its index
    arithmetic inlined: three method calls and a bin() per value made this a tenth of a
    load worker's CPU in the bursts (each report moves thousands of buckets). Reads the
    attributes of hdrhistogram 0.10.8 (pinned); tests/harness/test_load_client.py holds it to
    record_value bucket for bucket, min, max and total."""
    counts = histogram.counts
    mask, unit = histogram.sub_bucket_mask, histogram.unit_magnitude
    half_magnitude, half_count = histogram.sub_bucket_half_count_magnitude, histogram.sub_bucket_half_count
    shift = unit + half_magnitude + 1
    for value, count in counted.items():
        bucket = (value | mask).bit_length() - shift
        counts[((bucket + 1) << half_magnitude) + (value >> (bucket + unit)) - half_count] += count
    histogram.total_count += sum(counted.values())
    histogram.min_value = min(histogram.min_value, min(counted))
    histogram.max_value = max(histogram.max_value, max(counted))


def latency_summary(latencies):
    """count, p50, p95, p99, max and mean of a list of latencies, in seconds, through the
    same HdrHistogram as the load test's, so bench and load percentiles mean one thing."""
    histogram = LatencyHistogram()
    for value in latencies:
        histogram.record(value)
    return histogram.summary()


# -- delivery completeness ---------------------------------------------------------------

class DeliveryLedger:
    """What one listener received of one room, judged from the dense ids.

    A listener that starts at cursor c must receive every id after c exactly once and
    in order. Memory stays small when things go right: only ids skipped over and not
    yet seen are remembered.
    """

    __slots__ = ("start", "next_expected", "received", "duplicated", "out_of_order", "_gaps", "missed_reported")

    def __init__(self, start_cursor=0):
        self.start = start_cursor
        self.next_expected = start_cursor + 1
        self.received = 0
        self.duplicated = 0
        self.out_of_order = 0
        self.missed_reported = 0  # what the server said it no longer retained
        self._gaps = set()

    def record(self, message_id):
        self.received += 1
        if message_id == self.next_expected:
            self.next_expected += 1
        elif message_id > self.next_expected:
            self._gaps.update(range(self.next_expected, message_id))
            self.next_expected = message_id + 1
        elif message_id in self._gaps:
            self._gaps.discard(message_id)
            self.out_of_order += 1
        elif message_id > self.start:
            self.duplicated += 1
        else:
            self.duplicated += 1  # at or before the start cursor: sent although not asked for

    def record_run(self, first_id, last_id):
        """`record` of each id from first_id to last_id: a held poll's usual answer, one
        message or a burst's run of them, right after the last one received (none when
        last_id < first_id). The load client's compiled path (loadtests/_heldfast.c) does
        the first case itself; tests/harness/test_held_fast.py holds it to the same ledgers."""
        if first_id != self.next_expected:
            for message_id in range(first_id, last_id + 1):
                self.record(message_id)
            return
        self.received += last_id - first_id + 1
        self.next_expected = last_id + 1

    def rebase(self, cursor):
        """The server answered `reset` with `cursor`: the room's history is no longer what
        this listener saw. Ids after the cursor it held or skipped are forgotten; the next
        one owed is cursor + 1 (what it skipped up to the cursor stays owed)."""
        self._gaps = {gap for gap in self._gaps if gap <= cursor}
        self.start = min(self.start, cursor)
        self.next_expected = cursor + 1

    def lost(self, last_id):
        """Ids after the start cursor up to `last_id` (the room's final id) never received."""
        tail = max(0, last_id - (self.next_expected - 1))
        return len(self._gaps) + tail

    def complete(self, last_id):
        return self.lost(last_id) == 0 and self.duplicated == 0 and self.out_of_order == 0

    def to_dict(self):
        """Everything the ledger knows, JSON- and msgpack-safe (gaps are few when things go right)."""
        return {"start": self.start, "next_expected": self.next_expected, "received": self.received,
                "duplicated": self.duplicated, "out_of_order": self.out_of_order,
                "missed_reported": self.missed_reported, "gaps": sorted(self._gaps)}

    @classmethod
    def from_dict(cls, data):
        ledger = cls(data["start"])
        ledger.next_expected = data["next_expected"]
        ledger.received = data["received"]
        ledger.duplicated = data["duplicated"]
        ledger.out_of_order = data["out_of_order"]
        ledger.missed_reported = data.get("missed_reported", 0)
        ledger._gaps = set(data.get("gaps", ()))
        return ledger


def delivery_summary(ledgers, last_id_of_room):
    """Totals over many listeners; `last_id_of_room(ledger)` gives the final id it should reach."""
    totals = {"listeners": 0, "received": 0, "lost": 0, "duplicated": 0, "out_of_order": 0,
              "incomplete_listeners": 0}
    for ledger in ledgers:
        last_id = last_id_of_room(ledger)
        lost = ledger.lost(last_id)
        totals["listeners"] += 1
        totals["received"] += ledger.received
        totals["lost"] += lost
        totals["duplicated"] += ledger.duplicated
        totals["out_of_order"] += ledger.out_of_order
        if lost or ledger.duplicated or ledger.out_of_order:
            totals["incomplete_listeners"] += 1
    totals["complete"] = totals["incomplete_listeners"] == 0
    return totals


# -- memory per held connection -----------------------------------------------------------

def summed_rss(pids):
    """Resident memory of all the given processes together, in bytes (gone ones count 0)."""
    import psutil
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def summed_descriptors(pids):
    """Open descriptors of all the given processes together (gone ones count 0): with
    memory, what each held poll costs a process that holds its socket."""
    import psutil
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).num_fds()
        except psutil.NoSuchProcess:
            pass
    return total


def memory_per_connection(rss_idle, rss_holding, held):
    """Bytes each held poll costs: the rise in summed RSS of the serving processes over
    their idle RSS, divided by the number of held polls (the "memory per greenlet")."""
    if held <= 0:
        return None
    return (rss_holding - rss_idle) / held


# -- kernel memory per held connection ----------------------------------------------------

SOCKSTAT, SLABINFO, MEMINFO = "/proc/net/sockstat", "/proc/slabinfo", "/proc/meminfo"
# The slab caches a held TCP connection's kernel side lives in: the socket, its inode and
# file, its dentry, the epoll item watching it, a buffer head for queued data.
SOCKET_CACHES = ("TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi", "eventpoll_pwq",
                 "tcp_bind_bucket", "request_sock_TCP", "skbuff_head_cache")
KERNEL_BYTES = ("tcp_mem_bytes", "slab_bytes", "socket_slab_bytes")
KERNEL_COUNTS = ("tcp_inuse", "tcp_orphan", "tcp_tw")


def kernel_memory(sockstat=SOCKSTAT, slabinfo=SLABINFO, meminfo=MEMINFO, page_size=None):
    """The kernel's memory for connections right now, machine-wide (both ends of a loopback
    connection are on this machine): {"tcp_mem_bytes": sockstat's TCP `mem` pages in bytes
    (the socket buffers holding data), "tcp_inuse", "tcp_orphan", "tcp_tw": its counts,
    "slab_bytes": every slab cache's pages, "socket_slab_bytes": those of SOCKET_CACHES,
    "slab_source": "slabinfo"}; where /proc/slabinfo cannot be read (it is root's), "slab_bytes"
    is /proc/meminfo's Slab, "socket_slab_bytes" None and "slab_source" "meminfo"."""
    page_size = page_size or os.sysconf("SC_PAGE_SIZE")
    figures = {}
    with open(sockstat) as source:
        for line in source:
            if line.startswith("TCP:"):
                fields = line.split()[1:]
                values = dict(zip(fields[::2], (int(v) for v in fields[1::2])))
                figures.update(tcp_mem_bytes=values["mem"] * page_size, tcp_inuse=values["inuse"],
                               tcp_orphan=values["orphan"], tcp_tw=values["tw"])
    try:
        with open(slabinfo) as source:
            lines = source.read().splitlines()[2:]
    except OSError:
        with open(meminfo) as source:
            slab = next(int(line.split()[1]) * 1024 for line in source if line.startswith("Slab:"))
        return dict(figures, slab_bytes=slab, socket_slab_bytes=None, slab_source="meminfo")
    total = sockets = 0
    for line in lines:
        fields = line.split()
        # name active num objsize perslab pagesperslab : tunables ... : slabdata active_slabs num_slabs shared
        cache_bytes = int(fields[-2]) * int(fields[5]) * page_size
        total += cache_bytes
        sockets += cache_bytes if fields[0] in SOCKET_CACHES else 0
    return dict(figures, slab_bytes=total, socket_slab_bytes=sockets, slab_source="slabinfo")


def kernel_memory_per_connection(idle, holding, held):
    """Each held connection's share of the rise of kernel_memory() from `idle` to `holding`:
    bytes per connection, and the TCP counts' rise per connection (about 2 in use: both ends).
    Machine-wide figures, so other work on the machine blurs them."""
    if idle is None or holding is None or held <= 0:
        return None
    per = {}
    for name in KERNEL_BYTES + KERNEL_COUNTS:
        before, after = idle.get(name), holding.get(name)
        per[name] = None if before is None or after is None else (after - before) / held
    per["slab_source"] = holding.get("slab_source")
    return per


# -- CPU per delivery ----------------------------------------------------------------------

def cpu_per_delivery(cpu_seconds, deliveries):
    """Microseconds of CPU per message delivered to one listener: the same unit for the
    server and for the load generator, so "the harness costs less than what it measures"
    is one division (load-generator CPU / server CPU) read off two comparable figures."""
    if cpu_seconds is None or not deliveries:
        return None
    return cpu_seconds / deliveries * 1e6


def process_cpu_seconds(pid):
    """User + system CPU seconds a live process has used so far, read from /proc/<pid>/stat."""
    with open("/proc/%d/stat" % pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid):
    """User + system CPU seconds of a live process and every live descendant of it (a
    server's gunicorn master and workers), 0.0 when it is gone."""
    import psutil
    try:
        root = psutil.Process(pid)
        processes = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


SOFTIRQ_KINDS = ("NET_RX", "NET_TX")


def softirq_counts(text=None):
    """{kind: [count per CPU]} of the network softirqs this machine has run so far
    (/proc/softirqs, or its `text`): packets between network namespaces are handled there,
    on whichever CPU the sending process runs, so the counts show where that work went."""
    if text is None:
        with open("/proc/softirqs") as raw:
            text = raw.read()
    counts = {}
    for line in text.splitlines()[1:]:
        name, _, values = line.partition(":")
        if name.strip() in SOFTIRQ_KINDS:
            counts[name.strip()] = [int(value) for value in values.split()]
    return counts


def machine_busy_seconds():
    """CPU seconds every core of this machine has been busy so far (/proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds():
    """CPU seconds of this process and of every descendant it has waited for (the servers and
    client processes of finished runs, gunicorn's workers through gunicorn)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def redis_cpu_seconds(info_cpu):
    """User + system CPU seconds a redis-server has used so far, from its `INFO cpu` (a dict):
    the same figure as process_cpu_seconds (the whole process, every thread; forked children
    such as a save are counted apart by Redis and left out), read over the wire, so it also
    serves for nodes this machine did not start."""
    return float(info_cpu["used_cpu_user"]) + float(info_cpu["used_cpu_sys"])


def process_wakeups(pid):
    """Times a live process has gone to sleep waiting (voluntary context switches, from
    /proc/<pid>/status): an event-loop server sleeps once per wake-up of its loop, so this
    counts the wake-ups its sockets caused, whatever the machine's speed."""
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise OSError("no voluntary_ctxt_switches in /proc/%d/status" % pid)


# -- fan-out cost ---------------------------------------------------------------------------

def time_per_waiter(last_delivery_s, waiters):
    """Seconds of fan-out per woken waiter: from the post to the last answer received,
    divided by the waiters woken. Wall-clock, so it includes the rig's reading; the same
    rig reads every server, which keeps ratios between servers fair."""
    if last_delivery_s is None or not waiters:
        return None
    return last_delivery_s / waiters


# -- head against base ---------------------------------------------------------------------

def geometric_mean(values):
    return math.exp(sum(math.log(value) for value in values) / len(values))


@functools.lru_cache(maxsize=64)
@functools.lru_cache(maxsize=512)  # a simulation of many comparisons asks the same few again and again
def student_t_quantile(probability, degrees):
    """The `probability` quantile (above 0.5) of Student's t with `degrees` degrees of
    freedom: its density integrated (Simpson's rule) and the integral inverted by bisection,
    to 4 significant digits, without a statistics library."""
    scale = math.exp(math.lgamma((degrees + 1) / 2) - math.lgamma(degrees / 2)) / math.sqrt(degrees * math.pi)

    def density(x):
        return scale * (1 + x * x / degrees) ** (-(degrees + 1) / 2)

    def cdf(t, steps=2000):
        width = t / steps
        inner = sum((4 if step % 2 else 2) * density(step * width) for step in range(1, steps))
        return 0.5 + width / 3 * (density(0) + inner + density(t))

    low, high = 0.0, 1000.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return (low + high) / 2


def ratio_interval(ratios, confidence=0.95, resamples=10000, seed=13):
    """Head / base from paired runs, given each pair's ratio: the geometric mean of the
    ratios, and a confidence interval of it: the bootstrap's (the pairs resampled with
    replacement, percentile interval), widened where needed to Student's t interval of
    the mean log ratio. With few pairs the percentile bootstrap is far too narrow: with
    3 pairs its 95 % interval cannot reach past the smallest ratio, so any figure whose
    run-to-run noise exceeds its threshold would be called worse in one A/A run in 8.
    Seeded: the same runs always give the same interval."""
    tail = (1 - confidence) / 2
    ratio = low = high = geometric_mean(ratios)
    if resamples:  # 0: Student's t interval alone (a simulation of many comparisons wants it fast)
        draw = random.Random(seed)
        means = sorted(geometric_mean(draw.choices(ratios, k=len(ratios))) for _ in range(resamples))
        low, high = percentile(means, tail), percentile(means, 1 - tail)
    count = len(ratios)
    if count >= 2:
        logs = [math.log(value) for value in ratios]
        spread = math.sqrt(sum((value - math.log(ratio)) ** 2 for value in logs) / (count - 1))
        half = student_t_quantile(1 - tail, count - 1) * spread / math.sqrt(count)
        low, high = min(low, ratio * math.exp(-half)), max(high, ratio * math.exp(half))
    return ratio, low, high
