"""docs/results.md's entries for Chattle beside its peers (the aiohttp servers and nginx with
Nchan), made from a run's own JSON, so that a figure and its provenance cannot part.

    python -m results.peers docs/runs/peers-bench.json      # a bench.sweep run
    python -m results.peers docs/runs/peers-capacity.json   # a bench.capacity run

`--keep PATH` first writes the run's results.json (reports/<timestamp>-bench/ or -capacity/)
to PATH without what a page never shows (each probe's runs but the figures printed here).
The output goes between the entry's `<!-- made by: ... -->` and `<!-- end -->` lines;
tests/test_docs.py fails when the two differ.
"""

import argparse
import json
import sys

from instruments.measures import cpu_per_delivery, time_per_waiter

POINT_FIELDS = ("workers", "requested", "parked", "held_confirmed", "delivered", "complete_listeners", "latency",
                "latency_from_send", "last_delivery_s", "server_cpu_s", "client_cpu_s", "bytes_per_poll_median",
                "kernel_per_poll", "client_bound", "repeats", "p99_of_repeats", "machine_busy_cores")
RUN_FIELDS = ("requested", "passed", "failures", "p50_s", "p99_s", "client_lag_p99_s", "machine_busy_cores",
              "other_work_cores", "delivered", "complete_listeners")


def kept(results):
    """A results.json without what a page never shows."""
    if "points" in results:
        return {"provenance": results.get("provenance"), "peers": results["peers"], "repeats": results["repeats"],
                "load_average": results.get("load_average"), "peer_ratios": results["peer_ratios"],
                "points": [{name: point.get(name) for name in POINT_FIELDS} for point in results["points"]]}
    servers = []
    for entry in results["servers"]:
        search = dict(entry["search"], probes=[
            {"count": probe["count"], "passed": probe["passed"],
             "runs": [{name: run.get(name) for name in RUN_FIELDS} for run in probe["runs"]]}
            for probe in entry["search"]["probes"]])
        servers.append({"label": entry["label"], "search": search, "at_capacity": entry["at_capacity"],
                        "hold_observed": entry.get("hold_observed")})
    return {"provenance": results.get("provenance"), "verdict": results["verdict"], "slo_s": results["slo_s"],
            "other_work_cores_median": results.get("other_work_cores_median"), "elapsed_s": results["elapsed_s"],
            "servers": servers}


def number(value, pattern="%.0f", scale=1.0):
    return "-" if value is None else (pattern % (value * scale)).replace(",", " ")


def thousands(value):
    return "-" if value is None else "{:,}".format(int(value)).replace(",", " ")


def provenance_line(data, tail):
    made = data["provenance"]
    return "`%s` — %s, commit %s%s, %s; %s" % (
        made["command"], made["date"], (made["commit"] or "?")[:7], " (with changes not committed)"
        if made.get("dirty") else "", made["machine"], tail)


def label(workers):
    return "Chattle, 1 worker" if workers == 1 else "Chattle, %s workers" % workers \
        if isinstance(workers, int) else workers


def bench_section(data):
    load = data.get("load_average") or {}
    lines = [provenance_line(data, "shared machine (other engineers' work went on; load average %s at the start, "
                                   "%s at the end); median repeat of %d by p99."
                             % (number((load.get("start") or [None])[0], "%.1f"),
                                number((load.get("end") or [None])[0], "%.1f"), data["repeats"])),
             "",
             "| server | held polls | p50 / p99 | p50 / p99 from the rig's send | time per waiter | server CPU per "
             "delivery | RSS per held poll | kernel per held poll (slab, both ends) | answered of held, complete "
             "in the ledger |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for point in data["points"]:
        latency, from_send = point["latency"], point.get("latency_from_send") or {}
        kernel = point.get("kernel_per_poll") or {}
        lines.append("| %s | %s | %s / %s ms | %s / %s ms | %s µs | %s µs | %s KiB | %s KiB | %s of %s; %s |" % (
            label(point["workers"]), thousands(point["requested"]),
            number(latency["p50"], "%.0f", 1e3), number(latency["p99"], "%.0f", 1e3),
            number(from_send.get("p50"), "%.0f", 1e3), number(from_send.get("p99"), "%.0f", 1e3),
            number(time_per_waiter(point["last_delivery_s"], point["delivered"]), "%.1f", 1e6),
            number(cpu_per_delivery(point["server_cpu_s"], point["delivered"]), "%.1f"),
            number(point["bytes_per_poll_median"], "%.1f", 1 / 1024),
            number(kernel.get("slab_bytes"), "%.1f", 1 / 1024),
            thousands(point["delivered"]), thousands(point["requested"]), thousands(point["complete_listeners"])))
    lines.append("")
    for ratio in data["peer_ratios"]:
        lines.append("- **Chattle / %s** at %s polls: memory per held poll %s (%s / %s KiB), time per waiter %s "
                     "(%s / %s µs)." % (
                         ratio["peer"], thousands(ratio["requested"]), number(ratio["memory_ratio"], "%.2f"),
                         number(ratio["chattle_bytes_per_poll"], "%.1f", 1 / 1024),
                         number(ratio["peer_bytes_per_poll"], "%.1f", 1 / 1024),
                         number(ratio["time_per_waiter_ratio"], "%.2f"),
                         number(ratio["chattle_s_per_waiter"], "%.1f", 1e6),
                         number(ratio["peer_s_per_waiter"], "%.1f", 1e6)))
    return lines


def capacity_section(data):
    others = data.get("other_work_cores_median")
    lines = [provenance_line(data, "shared machine (other work took a median %s of the cores during the runs)."
                             % number(others, "%.1f")),
             "",
             "| server | capacity | bracket | the first failing count missed on | p50 / p99 at capacity | RSS per "
             "held poll | server CPU per delivery |",
             "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for entry in data["servers"]:
        search, at = entry["search"], entry["at_capacity"] or {}
        capacity, limit = search["capacity"], search.get("rig_limit")
        shown = "none" if capacity is None else ("at least %s" if limit else "**%s**") % thousands(capacity)
        lines.append("| %s | %s | [%s, %s) | %s | %s / %s ms | %s KiB | %s µs |" % (
            entry["label"], shown, thousands(search["bracket"][0]), thousands(search["bracket"][1]),
            (search.get("limited_by") or "nothing failed").replace("objective: ", "")
            + ("; the %s was the limit here" % limit["limit"] if limit else ""),
            number(at.get("p50_s"), "%.0f", 1e3), number(at.get("p99_s"), "%.0f", 1e3),
            number(at.get("bytes_per_poll_median"), "%.1f", 1 / 1024),
            number(at.get("server_us_per_delivery"), "%.1f")))
    lines += ["", "Verdict: " + data["verdict"].strip()]
    return lines


def section(data):
    return bench_section(data) if "points" in data else capacity_section(data)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a results.json of bench.sweep or bench.capacity (or its kept copy)")
    parser.add_argument("--keep", metavar="PATH", help="also write the run, without what a page never shows, to PATH")
    args = parser.parse_args(argv)
    with open(args.run) as source:
        data = json.load(source)
    if args.keep:
        data = kept(data)
        with open(args.keep, "w") as out:
            json.dump(data, out, indent=1)
            out.write("\n")
    print("\n".join(section(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
