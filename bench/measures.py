"""The one definition of each figure Chattle reports.

loadtests/, bench/, reports/ and the tests all compute wake-up latency, delivery
completeness and memory per held connection through these functions, so a number in
a load report and the same number in a capacity sweep mean the same thing.
"""

import math
import random

# -- wake-up latency -----------------------------------------------------------------

def wakeup_latency(received_at, message_ts):
    """Seconds from the server accepting a post (its `ts`) to a listener receiving it.

    Both are wall-clock times on this machine (client and server share its clock on
    loopback). Kept at full float precision: never rounded to milliseconds.
    """
    return received_at - message_ts


def percentile(sorted_values, fraction):
    """Linear interpolation between closest ranks (numpy's default), on sorted input."""
    if not sorted_values:
        return float("nan")
    position = (len(sorted_values) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def latency_summary(latencies):
    """count, p50, p95, p99, max and mean of a list of latencies, in seconds."""
    values = sorted(latencies)
    if not values:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    return {
        "count": len(values),
        "p50": percentile(values, 0.50),
        "p95": percentile(values, 0.95),
        "p99": percentile(values, 0.99),
        "max": values[-1],
        "mean": sum(values) / len(values),
    }


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

    def lost(self, last_id):
        """Ids after the start cursor up to `last_id` (the room's final id) never received."""
        tail = max(0, last_id - (self.next_expected - 1))
        return len(self._gaps) + tail

    def complete(self, last_id):
        return self.lost(last_id) == 0 and self.duplicated == 0 and self.out_of_order == 0


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


def memory_per_connection(rss_idle, rss_holding, held):
    """Bytes each held poll costs: the rise in summed RSS of the serving processes over
    their idle RSS, divided by the number of held polls (the "memory per greenlet")."""
    if held <= 0:
        return None
    return (rss_holding - rss_idle) / held


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


def ratio_interval(ratios, confidence=0.95, resamples=10000, seed=13):
    """Head / base from paired runs, given each pair's ratio: the geometric mean of the
    ratios, and a bootstrap confidence interval of it (the pairs resampled with
    replacement, percentile interval). Seeded: the same runs always give the same interval."""
    draw = random.Random(seed)
    means = sorted(geometric_mean(draw.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1 - confidence) / 2
    return geometric_mean(ratios), percentile(means, tail), percentile(means, 1 - tail)
