"""docs/results.md's "Clocks across hosts" entry, made from the runs' own records, so that a
figure and its provenance cannot part.

    python -m results.clocks docs/runs/cluster-demo.json

`make cluster-demo` writes reports/cluster-<pid>/cluster-demo.json ({"runs": [its run]});
docs/runs/cluster-demo.json holds the runs the entry shows, in its "runs" list, and the
libfaketime clock costs measured apart ("clock_costs"). Paste what this prints between
the entry's `made by` and `end` lines; tests/harness/test_load_cluster.py fails when the
two differ.
"""

import argparse
import datetime
import json
import sys

from instruments.measures import ms

FIX_WORDS = {"off": "off (the demo's setting)", "default": "libfaketime's default (on with this glibc)"}


def shared_words(percent):
    if percent is None:
        return "shared (others' runs went on)"
    return "shared: other processes used %.0f %% of a core on average" % percent


def run_line(run):
    """One row of the table: a run's latency, the client's lag and where the CPU went."""
    servers = run.get("server_cpu_s")
    rx = (run.get("softirqs") or {}).get("NET_RX")
    return "| %s | %s / %s | %s / %s | %s | %s | %s | %s | %d |" % (
        FIX_WORDS.get(run["monotonic_fix"], run["monotonic_fix"]),
        ms(run["wakeup_s"]["p50"], "%.1f"), ms(run["wakeup_s"]["p99"], "%.1f"),
        ms(run["lag_s"]["p50"], "%.1f"), ms(run["lag_s"]["p99"], "%.1f"),
        ", ".join("%s %s ms" % (worker["host"], ms(worker["lag_s"]["p99"], "%.1f")) for worker in run["workers"]),
        "-" if run["load_cpu_s"] is None else "%.1f s" % run["load_cpu_s"],
        " / ".join("%.1f" % servers.get(host, 0.0) for host in ("a", "b", "redis")) + " s" if servers else "-",
        " / ".join("%d" % count for count in rx) if rx else "-", run["lost"])


def provenance(run):
    started = datetime.datetime.fromtimestamp(run["started"], datetime.timezone.utc)
    return "`%s` — %s UTC, commit %s, %s; %s" % (run["command"], started.strftime("%Y-%m-%d %H:%M"),
                                                  run["commit"][:7], run["machine"],
                                                  shared_words(run.get("other_processes_cpu_percent")))


def section(document):
    """The entry's generated lines: each run's provenance, the table, the clock offsets and
    the libfaketime costs."""
    runs = document["runs"]
    lines = ["Three hosts made of network namespaces on this machine (host A: Redis and 2 gunicorn "
             "workers; host B: 1 worker; load hosts C and D, one Locust worker each, both under "
             "libfaketime, C's wall clock 2 s ahead, D's unshifted), %d listeners over the two servers, "
             "single posts into 15 rooms." % runs[0]["users"], ""]
    for number, run in enumerate(runs, 1):
        lines.append("%d. %s. %s: %d posts, %d deliveries, %d lost." % (
            number, provenance(run), "Passed" if run["passed"] else "FAILED", run["posts"], run["deliveries"],
            run["lost"]) + (" Client-bound: %s." % run["client_bound"] if run["client_bound"] else ""))
    lines += ["",
              "| load hosts' monotonic fix | wake-up p50 / p99 ms | client lag p50 / p99 ms | lag p99 by load host "
              "| load generator CPU | CPU of host A / B / Redis | NET_RX softirqs CPU0 / CPU1 | lost |",
              "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    lines += [run_line(run) for run in runs]
    lines.append("")
    for number, run in enumerate(runs, 1):
        lines.append("Offsets measured in run %d: %s." % (number, "; ".join(
            "%s %+.1f ms +- %.2f ms to %s" % (clock["host"], clock["offset"] * 1000, clock["bound"] * 1000,
                                              clock["server"]) for clock in run["clocks"])))
    costs = document.get("clock_costs")
    if costs:
        lines += ["", clock_costs_line(costs)]
    return lines


def clock_costs_line(costs):
    """libfaketime's price per clock read and the load worker's reads per delivery."""
    per_call, per_delivery = costs["instructions_per_call"], costs["calls_per_delivery"]
    extra = {clock: per_call[clock]["faked"] - per_call[clock]["plain"] for clock in ("realtime", "monotonic")}
    added = sum(extra[clock] * per_delivery[clock] for clock in extra)
    return ("libfaketime's own cost (%s — %s, commit %s, %s): a wall-clock read costs %d more instructions "
            "under it (%d against %d), a monotonic one %d more (%d against %d), by `%s`; a load worker "
            "reads the wall clock %.1f times and the monotonic clock %.1f times per delivery during the bursts "
            "(%s), so libfaketime adds about %d instructions per delivery." % (
                costs["machine"], costs["date"], costs["commit"][:7], costs["shared"], extra["realtime"],
                per_call["realtime"]["faked"], per_call["realtime"]["plain"], extra["monotonic"],
                per_call["monotonic"]["faked"], per_call["monotonic"]["plain"], costs["instructions_command"],
                per_delivery["realtime"], per_delivery["monotonic"], costs["calls_command"], added))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="docs/runs/cluster-demo.json")
    args = parser.parse_args(argv)
    with open(args.runs) as raw:
        print("\n".join(section(json.load(raw))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
