"""The `make bench` entry of docs/results.md, made from the sweep's own results.json.

    python -m results.bench docs/runs/bench.json
    python -m results.bench reports/<timestamp>-bench/results.json --keep docs/runs/bench.json
"""

import sys

from results import provenance_line, renderer_main, spaced, table

POINT_KEPT = ("workers", "requested", "bus", "rooms", "latency", "last_delivery_s", "bytes_per_poll_median",
              "server_cpu_s", "client_cpu_s", "client_bound", "held_confirmed", "delivered", "unanswered",
              "p99_of_repeats", "machine_busy_cores")


ANATOMY_SITES_KEPT = 6


def kept(results):
    """The sweep's results without each point's raw detail (per process, kernel, repeats' lists), and
    the anatomy of a held poll with its largest allocation sites only."""
    results["points"] = [{key: point[key] for key in POINT_KEPT if key in point} for point in results["points"]]
    anatomy = results.get("anatomy")
    if anatomy:
        anatomy["top_sites"] = anatomy.get("top_sites", [])[:ANATOMY_SITES_KEPT]
    return results


def server_name(point):
    workers = point["workers"]
    name = "%s" % workers if isinstance(workers, int) else workers
    return name + (", %s" % point["bus"] if point.get("bus") else "")


def busy(results):
    """The sweep's own record of the machine's load."""
    load = results.get("load_average") or {}
    if not load.get("start") or not load.get("end"):
        return None
    return "shared machine: load average %.1f at the start, %.1f at the end" % (load["start"][0], load["end"][0])


def render(results):
    provenance = results["provenance"]
    extra = " (median of %d repeat(s); %.0f s)" % (results["repeats"], results["elapsed_s"])
    lines = [provenance_line(provenance, "make bench", extra=extra, busy=busy(results)), ""]
    rows = []
    for point in results["points"]:
        latency = point["latency"]
        rows.append((server_name(point), spaced(point["requested"]), "%.0f ms" % (latency["p50"] * 1000),
                     "%.0f ms" % (latency["p99"] * 1000), "%.0f ms" % (point["last_delivery_s"] * 1000),
                     "%.1f KiB" % (point["bytes_per_poll_median"] / 1024),
                     "-" if point.get("server_cpu_s") is None else "%.2f s" % point["server_cpu_s"]))
    lines += table(("workers or server", "held polls", "p50", "p99", "last delivery", "RSS per held poll",
                    "server CPU per fan-out"), rows)
    ratios = results.get("peer_ratios") or []
    if ratios:
        lines += [""] + table(("Chattle, 1 worker / peer", "held polls", "memory per held poll", "time per waiter"),
                              [(ratio["peer"], spaced(ratio["requested"]), "%.2f" % ratio["memory_ratio"],
                                "%.2f" % ratio["time_per_waiter_ratio"]) for ratio in ratios])
    capacity = results.get("capacity") or {}
    if capacity:
        lines += ["", "Largest count tried that kept p99 under %.0f ms: %s." % (
            results["slo_s"] * 1000, "; ".join("%s: %s" % (name if not name.isdigit() else name + " worker(s)",
                                                          spaced(count) if count else "none")
                                               for name, count in capacity.items()))]
    return lines


def main(argv=None):
    return renderer_main(__doc__, render, kept, argv)


if __name__ == "__main__":
    sys.exit(main())
