"""The "Clocks across hosts" entry of docs/results.md, made from the summary.json of the load
run `make cluster-demo` drives across its namespace hosts (loadtests/cluster_demo.py).

    python -m results.clocks docs/runs/clocks.json
    python -m results.clocks reports/<timestamp>-load/summary.json --keep docs/runs/clocks.json
"""

import sys

from results import provenance_line, renderer_main, spaced, table
from results.load import checks_text, kept


def render(summary):
    run, delivery = summary["run"], summary["delivery"]
    lines = [provenance_line(summary["run"]["provenance"], "make cluster-demo",
                             others_percent=summary.get("other_processes_cpu_mean"),
                             extra=" (%s listeners over the load hosts, servers %s)" % (
                                 spaced(run["users"]), ", ".join(run.get("servers") or []))), ""]
    rows = [(clock["host"], clock["server"], "%+.1f ms" % (clock["offset"] * 1000), "%.2f ms" % (clock["bound"] * 1000),
             "%+.1f s" % clock["kernel_skew"] if clock.get("kernel_skew") is not None else "-")
            for clock in sorted(summary.get("clocks") or [], key=lambda clock: (clock["host"], clock["server"]))]
    lines += table(("load host", "server", "clock offset measured", "+-", "skew set on the host"), rows)
    shares = sorted((summary.get("worker_shares") or {}).values(), key=lambda share: share.get("host") or "")
    lines += [""] + table(("load host", "listeners", "deliveries", "corrected wake-up p50", "p99"), [
        (share.get("host"), spaced(share["listeners"]), spaced(share["deliveries"]),
         "%.1f ms" % (share["latency"]["p50"] * 1000), "%.1f ms" % (share["latency"]["p99"] * 1000))
        for share in shares])
    lines += ["", "%s lost, %s duplicated; held polls peak %s. The run's checks: %s." % (
        delivery["lost"], delivery["duplicated"], spaced(summary["held_polls_peak"] or 0), checks_text(summary))]
    return lines


def main(argv=None):
    return renderer_main(__doc__, render, kept, argv)


if __name__ == "__main__":
    sys.exit(main())
