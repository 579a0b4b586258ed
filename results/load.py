"""A `make load` entry of docs/results.md, made from the run's own summary.json.

    python -m results.load docs/runs/<name>.json
    python -m results.load reports/<timestamp>-load/summary.json --keep docs/runs/<name>.json
"""

import sys

from loadtests import options
from results import plural, provenance_line, renderer_main, spaced, table

DROPPED = ("final_cursors", "load_workers", "errors", "charts")


def make_command(command):
    """`make load USERS=...` for `python -m loadtests.run --users ...`: one table names both."""
    words = command.split()[3:] if command.startswith("python -m loadtests.run") else None
    if words is None:
        return command
    made, index = ["make load"], 0
    while index < len(words):
        option = options.BY_NAME.get(words[index][2:])
        if option is None or not option.variable:
            return command
        if option.kind == options.SWITCH:
            made.append("%s=1" % option.variable)
            index += 1
        else:
            if words[index + 1] != options.shown(option.default):  # the Makefile passes some defaults on
                made.append("%s=%s" % (option.variable, words[index + 1]))
            index += 2
    return " ".join(made)


def kept(summary):
    """The summary without per-listener and per-process detail."""
    for name in DROPPED:
        summary.pop(name, None)
    run = summary.get("run", {})
    run.pop("stages", None)
    run.pop("chaos_record", None)
    for name in ("table", "pids", "room_slots"):
        (run.get("cluster") or {}).pop(name, None)
    return summary


def ms(seconds, digits=0):
    return "-" if seconds is None else "%.*f ms" % (digits, seconds * 1000)


def checks_text(summary):
    """The run's verdict: its checks all passed, or which failed and why."""
    failed = [check for check in summary["checks"] if not check["passed"] and not check.get("note")]
    return "all passed" if not failed else "**failed**: " + "; ".join(
        "%s (%s)" % (check["check"], check["detail"]) for check in failed)


def render(summary):
    run, provenance = summary["run"], summary["run"]["provenance"]
    delivery, cpu, memory = summary["delivery"], summary["cpu"], summary.get("memory") or {}
    latency, lag, machine = summary["wakeup_latency_s"], summary["client_lag_s"], summary["machine_check"]
    lines = [provenance_line(provenance, make_command(provenance["command"]),
                             others_percent=summary.get("other_processes_cpu_mean"),
                             extra=" (%s, %s, %g s, %s)" % (
                                 plural(run["users"], "listener"), plural(run["rooms"], "room"), run["duration"],
                                 run["server"])), ""]
    rows = [
        ("held polls peak", "%s of %s" % (spaced(summary["held_polls_peak"] or 0), spaced(run["users"]))),
        ("posts / deliveries", "%d in bursts of %d / %s" % (summary["posts"], run["burst_size"],
                                                            spaced(summary["deliveries"]))),
        ("lost, duplicated, out of order, gave up", "%d, %d, %d, %d" % (
            delivery["lost"], delivery["duplicated"], delivery["out_of_order"], delivery["gave_up"])),
        ("server wake-up latency p50 / p95 / p99 / max", "%s / %s / %s / %s ms" % tuple(
            "%.0f" % (latency[key] * 1000) for key in ("p50", "p95", "p99", "max"))),
        ("client lag p50 / p95 / p99", "%s / %s / %s ms (%s)" % (
            tuple("%.1f" % (lag[key] * 1000) for key in ("p50", "p95", "p99"))
            + ("client-bound" if summary.get("client_bound") else "not client-bound",))),
        ("machine-saturated burst seconds", "%d of %d" % (machine["burst_seconds_saturated"],
                                                          machine["burst_seconds"])),
    ]
    if memory.get("rss_idle"):
        rows.append(("server RSS idle / holding the polls", "%.1f / %.1f MiB (%.1f KiB per held poll)" % (
            memory["rss_idle"] / 2 ** 20, memory["rss_holding"] / 2 ** 20, memory["bytes_per_held_poll"] / 1024)))
    if cpu.get("server_cpu_s"):
        rows.append(("CPU, load generator / server", "%.1f / %.1f s: **ratio %.2f** (%.0f / %.0f us per delivery)" % (
            cpu["client_cpu_s"], cpu["server_cpu_s"], cpu["client_over_server"], cpu["client_us_per_delivery"],
            cpu["server_us_per_delivery"])))
    cluster, setup = summary.get("cluster"), run.get("cluster") or {}
    if cluster and cluster.get("shards"):
        shards = cluster["shards"]
        rows.append(("Redis Cluster", "%d masters, %d replicas%s; `--redis-wait` %s; the nodes' CPU %.1f s, %.1f s of "
                                      "it on the shards that carried posts" % (
                                          len(shards), sum(len(shard["replicas"]) for shard in shards),
                                          " started for the run on loopback" if setup.get("local") else "",
                                          "the default" if setup.get("redis_wait_ms") is None
                                          else "%d ms" % setup["redis_wait_ms"], cluster["cluster_cpu_s"],
                                          sum(shard["cpu_s"] for shard in shards if shard["posts"]))))
    rows.append(("checks", checks_text(summary)))
    lines += table(("figure", "value"), rows)
    return lines


def main(argv=None):
    return renderer_main(__doc__, render, kept, argv)


if __name__ == "__main__":
    sys.exit(main())
