"""The canary: how fast this machine runs a fixed piece of work right now, and how much of
it others take. A comparison reads it before and after every run; a round whose canary
moved by more than a threshold ran on a different machine than its neighbours (a
neighbour's build, a noisy VM host) and is run again once (loadtests/compare.py).

A reading is
  loop_s         seconds of wall time a fixed CPU-bound loop took (the median of a few):
                 rises when the core is shared or clocked down
  steal_percent  the hypervisor's steal time over the reading, % of the machine's time
  others_percent other processes' CPU over the reading, in % of one core: the machine's
                 busy time less this process's own (nothing of the comparison runs then)
"""

import os
import time

from instruments.measures import machine_busy_seconds, own_cpu_seconds

LOOP_SQUARES = 300_000   # about 20-30 ms of one core here: short against a run, long against a tick
LOOP_REPEATS = 5
STEAL_FIELD = 8          # /proc/stat's cpu line: user nice system idle iowait irq softirq steal


def fixed_loop(squares=LOOP_SQUARES):
    return sum(i * i for i in range(squares))


def steal_seconds():
    """Seconds the hypervisor gave this machine's CPUs to others so far (/proc/stat)."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    if len(fields) <= STEAL_FIELD:
        return 0.0
    return int(fields[STEAL_FIELD]) / os.sysconf("SC_CLK_TCK")


def read_canary(repeats=LOOP_REPEATS, squares=LOOP_SQUARES):
    """One reading: {"loop_s", "steal_percent", "others_percent", "window_s"}."""
    busy, own, steal, started = machine_busy_seconds(), own_cpu_seconds(), steal_seconds(), time.monotonic()
    times = []
    for _ in range(repeats):
        begun = time.perf_counter()
        fixed_loop(squares)
        times.append(time.perf_counter() - begun)
    window = max(time.monotonic() - started, 1e-6)
    others = (machine_busy_seconds() - busy) - (own_cpu_seconds() - own)
    cores = os.cpu_count() or 1
    times.sort()
    return {"loop_s": times[len(times) // 2], "steal_percent": 100.0 * (steal_seconds() - steal) / (window * cores),
            "others_percent": max(0.0, 100.0 * others / window), "window_s": window}


def canary_moved(readings):
    """How far the loop's time moved across `readings` (a round's, before and after each
    run): the slowest over the fastest, less 1 (0.25: a quarter slower at some point)."""
    loops = [reading["loop_s"] for reading in readings if reading and reading.get("loop_s")]
    if len(loops) < 2:
        return 0.0
    return max(loops) / min(loops) - 1


def canary_line(readings):
    loops = [reading["loop_s"] * 1000 for reading in readings if reading]
    others = [reading["others_percent"] for reading in readings if reading]
    steal = [reading["steal_percent"] for reading in readings if reading]
    if not loops:
        return "canary: no reading"
    return "canary loop %.1f-%.1f ms (moved %.0f%%), others %.0f-%.0f%% of a core, steal up to %.1f%%" % (
        min(loops), max(loops), canary_moved(readings) * 100, min(others), max(others), max(steal))
