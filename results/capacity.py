"""The `make capacity` entry of docs/results.md, made from the search's own results.json.

    python -m results.capacity docs/runs/capacity.json
    python -m results.capacity reports/<timestamp>-capacity/results.json --keep docs/runs/capacity.json
"""

import sys

from results import provenance_line, renderer_main, spaced, table

AT_CAPACITY_KEPT = ("p50_s", "p99_s", "last_delivery_s", "bytes_per_poll", "server_cpu_s", "client_cpu_s",
                    "delivered", "server_us_per_delivery", "client_us_per_delivery", "other_work_cores")


def kept(results):
    """The search's results without each probe's runs: the capacity, its bracket and the run at it."""
    for server in results["servers"]:
        search = server["search"]
        search["probes"] = [{"count": probe["count"], "passed": probe.get("passed")} for probe in search["probes"]]
        if server.get("at_capacity"):
            server["at_capacity"] = {key: server["at_capacity"].get(key) for key in AT_CAPACITY_KEPT}
        server.pop("hold_checks", None)
    return results


def render(results):
    others = results.get("other_work_cores_median")
    lines = [provenance_line(results["provenance"], "make capacity",
                             others_percent=None if others is None else others * 100,
                             extra=" (objective p99 %.0f ms, every message delivered; the search took %.0f s)"
                             % (results["slo_s"] * 1000, results["elapsed_s"])), ""]
    rows = []
    for server in results["servers"]:
        search, at = server["search"], server.get("at_capacity") or {}
        low, high = search["bracket"]
        bracket = "[%s, %s)" % (spaced(low) if low else "-", spaced(high) if high else "-")
        capacity = search["capacity"]
        rows.append((server["label"], "**%s**" % spaced(capacity) if capacity else "none", bracket,
                     server.get("limited_by") or search.get("limited_by") or "-",
                     " / ".join("%.0f" % (at[key] * 1000) for key in ("p50_s", "p99_s", "last_delivery_s"))
                     + " ms" if at else "-",
                     "%.1f KiB" % (at["bytes_per_poll"] / 1024) if at.get("bytes_per_poll") else "-",
                     "%.2f s (%.0f µs per delivery)" % (at["server_cpu_s"], at["server_us_per_delivery"])
                     if at.get("server_cpu_s") else "-"))
    lines += table(("server", "capacity", "bracket", "the first failing count missed on",
                    "p50 / p99 / last delivery at capacity", "server RSS per held poll", "server CPU per fan-out"),
                   rows)
    bounded = [server["label"] for server in results["servers"] if held_back(server)]
    if bounded:
        lines += ["", "%s: the search ran out of a resource (the process's open files) before p99 reached the "
                      "objective, so the capacity is a lower bound." % "; ".join(bounded)]
    return lines


def held_back(server):
    """Whether the server's search ended on a resource rather than on the objective."""
    return (server["search"].get("limited_by") or "").startswith("hold")


def main(argv=None):
    return renderer_main(__doc__, render, kept, argv)


if __name__ == "__main__":
    sys.exit(main())
