"""Turn one load run into its report: summary.json, PNG charts with captions, report.html.

Inputs: the per-second samples of run.py, raw/run.json (what the Locust master added up
from its workers' reports: latency and client-lag HdrHistograms, every listener's
ledger, every post, the errors, each process's CPU), the rooms' final cursors, and
Locust's own CSV. Figures go through instruments/measures.py so they mean what they mean
everywhere else.
"""

import collections
import csv
import os

from instruments.measures import (
    CLIENT_LAG_FLOOR,
    CLIENT_LAG_SHARE,
    client_bound,
    cpu_per_delivery,
    delivery_summary,
    memory_per_connection,
    ms,
)
from instruments.page import machine_description, machine_line, write_html, write_json
from loadtests.proxy_cost import cost_figures, table_rows
from loadtests.tally import RunTally

TARGET_REACHED_FRACTION = 0.95
CONTENDED_PERCENT = 50.0      # other processes' mean CPU, in % of one core, that makes figures suspect
CLIENT_CPU_SHARE = 0.5        # load-generator CPU above this share of the server's: a warning (a cost, not validity)
MACHINE_BUSY_SHARE = 0.90     # a second in which everything together used this share of all cores is saturated
MACHINE_BOUND_SHARE = 0.25    # more of the burst seconds saturated than this: machine-bound


def load_tally(report_dir):
    path = os.path.join(report_dir, "raw", "run.json")
    return RunTally.read(path) if os.path.exists(path) else None


def locust_totals(report_dir):
    path = os.path.join(report_dir, "locust_stats.csv")
    totals = {"requests": None, "failures": None, "by_name": {}}
    if not os.path.exists(path):
        return totals
    with open(path) as stats:
        for row in csv.DictReader(stats):
            entry = {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                     "median_ms": row.get("Median Response Time"), "p99_ms": row.get("99%")}
            if row["Name"] == "Aggregated":
                totals["requests"], totals["failures"] = entry["requests"], entry["failures"]
            else:
                totals["by_name"]["%s %s" % (row["Type"], row["Name"])] = entry
    return totals


def stage_origin(run_info):
    """The wall-clock time of the stages' 0 s: when the shape started (the master writes it
    to run.json), else when Locust started. Stages, samples and charts all count from it."""
    return run_info.get("shape_started") or run_info.get("locust_started") or run_info.get("started") or 0


def memory_figures(samples, run_info):
    """Idle RSS before anyone connected, and RSS with the most polls held before the first post."""
    started = run_info.get("locust_started") or 0
    idle = [row["server_rss"] for row in samples if row.get("server_rss") and row["time"] < started]
    hold_end = stage_origin(run_info) + next((s["end"] for s in run_info.get("stages") or [] if s["name"] == "hold"), 0)
    holding = [row for row in samples if row.get("held_polls") and row.get("server_rss") and row["time"] < hold_end]
    if not idle or not holding:
        return {"rss_idle": None, "rss_holding": None, "held_at_peak": None, "bytes_per_held_poll": None}
    peak = max(holding, key=lambda row: (row["held_polls"], row["time"]))
    return {"rss_idle": min(idle), "rss_holding": peak["server_rss"], "held_at_peak": peak["held_polls"],
            "bytes_per_held_poll": memory_per_connection(min(idle), peak["server_rss"], peak["held_polls"])}


def server_figures(samples, run_info):
    """Per server URL (from its /stats): peak held polls, RSS idle (before anyone connected)
    and at that peak, and RSS per held poll. /stats RSS is what the server hosts' own
    processes report, so it holds for servers on other machines too."""
    started = run_info.get("locust_started") or 0
    figures = {}
    for url in run_info.get("servers") or []:
        rows = [(row["time"], row["servers"][url]) for row in samples if url in (row.get("servers") or {})]
        idle = [entry["rss"] for moment, entry in rows if entry["rss"] and moment < started]
        holding = [(entry["held_polls"], moment, entry["rss"]) for moment, entry in rows
                   if entry["held_polls"] and entry["rss"]]
        peak = max(holding) if holding else (None, None, None)
        figures[url] = {"held_polls_peak": peak[0], "rss_idle": min(idle) if idle else None, "rss_at_peak": peak[2],
                        "bytes_per_held_poll": memory_per_connection(min(idle), peak[2], peak[0])
                        if idle and peak[0] else None}
    return figures


def clock_figures(tally):
    """Each load process's offset to each server's clock, with its bound (instruments/clocks.py)."""
    rows = []
    for worker_id, worker in sorted((tally.workers if tally else {}).items()):
        clocks = worker.get("clocks") or {}
        for server in clocks.get("servers") or []:
            rows.append({"worker": worker_id, "host": worker["host"], "pid": worker["pid"], "server": server["url"],
                         "offset": server["offset"], "bound": server["bound"],
                         "kernel_skew": clocks.get("kernel_skew")})
    return rows


HELD_PATHS = {"compiled": ", held polls read by the compiled path",
              "python": ", held polls read by the Python path (loadtests/_heldfast.c not built: run `make venv`; "
                        "the client costs more)",
              "receipts": ", held polls read by the Python path (CHAOS=: each message's id and ts kept)",
              "tls": ", held polls read by the Python path, known answers the short way once decrypted (https://: "
                     "the compiled path frames plain bytes only)"}


def worker_shares(tally):
    """Each load worker's share of the listeners and deliveries; a worker the master stopped
    hearing before its last report has its unreported listeners counted as lost contact."""
    workers = tally.workers if tally else {}
    listeners = sum(worker.get("listeners_started") or 0 for worker in workers.values()) or 1
    deliveries = sum(worker.get("deliveries") or 0 for worker in workers.values()) or 1
    return {worker_id: {"host": worker["host"], "pid": worker["pid"],
                        "listeners": worker.get("listeners_started") or 0,
                        "listener_share": (worker.get("listeners_started") or 0) / listeners,
                        "deliveries": worker.get("deliveries") or 0,
                        "delivery_share": (worker.get("deliveries") or 0) / deliveries,
                        "cpu_seconds": worker.get("cpu_seconds"), "lost": bool(worker.get("lost")),
                        "held_path": worker.get("held_path"),
                        "latency": worker.get("latency") or {}, "lag": worker.get("lag") or {},
                        "timed_wait_early": (worker.get("clocks") or {}).get("timed_wait_early"),
                        "clock_preload": (worker.get("clocks") or {}).get("preload"),
                        "lost_contact": (worker.get("listeners_started") or 0) - (worker.get("listeners_ended") or 0)
                        if worker.get("lost") else 0}
            for worker_id, worker in sorted(workers.items())}


def machine_check(samples, run_info):
    """Seconds in which server, load generator and everything else together used at least
    MACHINE_BUSY_SHARE of all cores; during the bursts, more than MACHINE_BOUND_SHARE of
    them makes the run machine-bound: its latencies include waiting for a core."""
    cores = os.cpu_count() or 1
    busy_mark = MACHINE_BUSY_SHARE * 100.0 * cores
    origin = stage_origin(run_info)
    bursts = next((stage for stage in run_info.get("stages") or [] if stage["name"] == "bursts"), None)
    saturated, burst_seconds, burst_saturated = [], 0.0, 0.0
    for row in samples:
        if row.get("machine_cpu") is None:
            continue
        busy = row["machine_cpu"] >= busy_mark
        if busy:
            saturated.append(row["time"] - origin)
        if bursts and bursts["start"] <= row["time"] - origin < bursts["end"]:
            # A row covers the time since the previous one: more than a second when the
            # sampler's /stats probes waited on a server busy with a fan-out.
            covered = row.get("seconds") or 1.0
            burst_seconds += covered
            burst_saturated += covered if busy else 0.0
    share = burst_saturated / burst_seconds if burst_seconds else None
    return {"cores": cores, "busy_mark_percent": busy_mark, "saturated_seconds": saturated,
            "burst_seconds": round(burst_seconds), "burst_seconds_saturated": round(burst_saturated),
            "burst_share": share,
            "machine_bound": bool(share is not None and share > MACHINE_BOUND_SHARE)}


def client_bound_reason(latency, lag, shares=None):
    """Why the latencies are partly the client's (instruments.measures.client_bound), or None;
    with several load workers (`shares`, worker_shares), each one's lag p99 and what of it
    is known to be its harness's (load_host_causes)."""
    if not client_bound(lag.get("p99"), latency.get("p99")):
        return None
    reason = ("client lag p99 %.1f ms is over %.0f%% of the server's wake-up p99 %.1f ms and over %.0f ms"
              % (lag["p99"] * 1000, CLIENT_LAG_SHARE * 100, latency["p99"] * 1000, CLIENT_LAG_FLOOR * 1000))
    if shares and len(shares) > 1:
        reason += "; by load worker: " + ", ".join(
            "%s/%s %s" % (share["host"], share["pid"], ms((share.get("lag") or {}).get("p99"), "%.1f ms"))
            for share in shares.values())
    causes = load_host_causes(shares or {})
    return reason + ("; " + "; ".join(causes) if causes else "")


def load_host_causes(shares):
    """What makes a load worker's client lag its own harness's rather than the server's, one
    line per worker it concerns: timed waits that return before their deadline
    (instruments.clocks.monotonic_wait_early), which make CPython's GIL hand-off spin."""
    causes = []
    for share in shares.values():
        early = share.get("timed_wait_early")
        if early:
            preload = share.get("clock_preload")
            causes.append("%s/%s: its timed waits return %.1f ms before their deadline%s, so its GIL hand-off "
                          "spins and ready answers wait to be read; run it with FAKETIME_FORCE_MONOTONIC_FIX=0 "
                          "and FAKETIME_DONT_FAKE_MONOTONIC=1" % (
                              share["host"], share["pid"], early * 1000,
                              " (under %s, %s)" % (preload["library"], monotonic_fix_words(preload))
                              if preload else ""))
    return causes


def monotonic_fix_words(preload):
    setting = preload.get("force_monotonic_fix")
    return "libfaketime's monotonic fix %s" % ("left to its default" if setting is None
                                                else "set to %s" % setting)


def cpu_figures(tally, run_info, deliveries):
    """CPU seconds of server and load generator over the run, and per delivery.

    The load generator is every process the command starts except the server's: the
    Locust master and workers, and the orchestrator with its sampler (this command's own
    process, up to its report's charts). Locust's share is the largest of three readings
    of the same processes, each a lower bound: what each read of itself at its last report
    (workers) and when it wrote run.json (master), start-up not included; the sampler's
    last /proc readings of their pids; and what the orchestrator's RUSAGE_CHILDREN gained
    when it reaped the master, which reaped its workers (start-up included, local only)."""
    reported = None
    if tally is not None and tally.workers:
        reported = sum(worker.get("cpu_seconds") or 0.0 for worker in tally.workers.values())
        reported += (tally.master or {}).get("cpu_seconds") or 0.0
    readings = [value for value in (reported, run_info.get("client_cpu_seconds_sampled"),
                                    run_info.get("client_cpu_seconds_reaped")) if value is not None]
    locust = max(readings) if readings else None
    orchestrator = run_info.get("orchestrator_cpu_seconds")
    client = None if locust is None else locust + (orchestrator or 0.0)
    server = run_info.get("server_cpu_seconds")
    ratio = client / server if client is not None and server else None
    return {"server_cpu_s": server, "client_cpu_s": client, "locust_cpu_s": locust,
            "locust_cpu_s_reported": reported, "client_cpu_s_sampled": run_info.get("client_cpu_seconds_sampled"),
            "locust_cpu_s_reaped": run_info.get("client_cpu_seconds_reaped"), "orchestrator_cpu_s": orchestrator,
            "client_over_server": ratio,
            "warning": None if ratio is None or ratio <= CLIENT_CPU_SHARE else
            ("the load generator used %.2f of the server's CPU (over %.2f): its cost is high beside what it "
             "measures (small runs and few posts weigh its fixed costs most)" % (ratio, CLIENT_CPU_SHARE)),
            "server_us_per_delivery": cpu_per_delivery(server, deliveries),
            "client_us_per_delivery": cpu_per_delivery(client, deliveries)}


def listener_figures(tally, cursors):
    """Completeness of every listener that listened to the end; those that gave up apart."""
    entries = tally.ledgers() if tally is not None else []
    last_posted = {}
    for room, message_id, _ts, *_epoch in (tally.posts if tally is not None else []):
        last_posted[room] = max(last_posted.get(room, 0), message_id)
    final_ids = dict(last_posted, **cursors)  # the server's word wins; posts are the fallback
    listened = [(entry, ledger) for entry, ledger in entries if not entry["gave_up"] and ledger is not None]
    # A listener owes every id up to the room's last when it stopped listening
    # (`listened_until`), and no more: later posts were never its to receive.
    owed = {}
    for entry, ledger in listened:
        last = final_ids.get(entry["room"], ledger.next_expected - 1)
        until = entry.get("listened_until")
        owed[id(ledger)] = last if until is None else min(last, until)
    delivery = delivery_summary([ledger for _entry, ledger in listened], lambda ledger: owed[id(ledger)])
    delivery["missed_reported"] = sum(ledger.missed_reported for _entry, ledger in listened)
    delivery["caught_up_at_stop"] = sum(entry["caught_up"] for entry, _ledger in entries)
    gave_up = [entry for entry, _ledger in entries if entry["gave_up"]]
    reasons = collections.Counter(entry["gave_up"].split(":", 1)[0] for entry in gave_up)
    delivery["gave_up"] = len(gave_up)
    delivery["gave_up_reasons"] = dict(reasons.most_common())
    delivery["gave_up_examples"] = [entry["gave_up"] for entry in gave_up[:5]]
    delivery["received_by_those_who_gave_up"] = sum(ledger.received for entry, ledger in entries
                                                     if entry["gave_up"] and ledger is not None)
    # Listeners of a load worker that died: no ledger ever came, so they are lost contact.
    dead = sum(share["lost_contact"] for share in worker_shares(tally).values())
    if dead:
        delivery["gave_up"] += dead
        reason = "lost contact (its load worker stopped reporting)"
        delivery["gave_up_reasons"][reason] = dead
    return delivery, final_ids


def measured_cpu(row):
    """The CPU of a sample's processes this run started: server, proxy and load generator."""
    return (row.get("server_cpu") or 0) + (row.get("proxy_cpu") or 0) + (row.get("client_cpu") or 0)


def build_summary(report_dir, run_info, samples, cursors):
    tally = load_tally(report_dir)
    if tally is not None and tally.shape_started:
        run_info["shape_started"] = tally.shape_started
    delivery, final_ids = listener_figures(tally, cursors)
    latency = tally.latency.summary() if tally else {"count": 0}
    lag = tally.lag.summary() if tally else {"count": 0}
    deliveries = delivery["received"] + delivery["received_by_those_who_gave_up"]
    held = [row["held_polls"] for row in samples if row.get("held_polls") is not None]
    cpu_samples = [row["server_cpu"] for row in samples if row.get("server_cpu") is not None]
    others = [row["machine_cpu"] - measured_cpu(row) for row in samples if row.get("machine_cpu") is not None]
    others_mean = max(0.0, sum(others) / len(others)) if others else None
    locust = locust_totals(report_dir)
    memory = memory_figures(samples, run_info)
    machine = machine_check(samples, run_info)
    cpu = cpu_figures(tally, run_info, deliveries)
    users = run_info["users"]
    posts = len(tally.posts) if tally else 0
    shares = worker_shares(tally)
    client_bound = client_bound_reason(latency, lag, shares)
    cluster = cluster_part(report_dir, run_info, tally, final_ids)
    hold_end = stage_origin(run_info) + next((s["end"] for s in run_info.get("stages") or [] if s["name"] == "hold"),
                                             0)
    costs = cost_figures(samples, run_info, latency, lag, cpu, deliveries, hold_end)
    costs["held_paths"] = sorted({share.get("held_path") or "?" for share in shares.values()})
    without_proxy = run_info.get("without_proxy")
    failover = (cluster or {}).get("failover")

    checks = []
    judged_by_row = []   # with --chaos: the checks that decide (the rest are notes: the fault causes them)

    def check(name, passed, detail):
        checks.append({"check": name, "passed": bool(passed), "detail": detail})

    workers = len(tally.workers) if tally else 0
    check("run completed", not run_info.get("run_error") and not run_info.get("interrupted") and workers > 0,
          run_info.get("run_error") or ("interrupted" if run_info.get("interrupted") else
                                        "%d Locust worker(s) reported to the master" % workers))
    chaos = chaos_part(run_info, tally)
    if chaos is not None:
        if run_info["chaos"] == "cluster-failover":
            failover_checks(check, failover, delivery)
        check("CHAOS=%s: nothing lost silently, nothing duplicated, service back by itself" % chaos["fault"],
              chaos["passed"], chaos["verdict"] + "; " + chaos_detail(chaos))
        judged_by_row = [entry["check"] for entry in checks]
    else:
        check("every message delivered once, in order", delivery["complete"] and delivery["listeners"] > 0,
              "%(lost)d lost, %(duplicated)d duplicated, %(out_of_order)d out of order over %(listeners)d listeners "
              "that listened to the end" % delivery)
    check("no listener gave up", delivery["gave_up"] == 0,
          "%d gave up (%s)" % (delivery["gave_up"], ", ".join("%s: %d" % item for item in
                                                               delivery["gave_up_reasons"].items()) or "none"))
    check("messages were posted and delivered", posts > 0 and latency["count"] > 0,
          "%d posts, %d deliveries" % (posts, deliveries))
    error_count = tally.error_count if tally else 0
    if failover:
        from loadtests.cluster_load import failover_errors
        within, outside = failover_errors(failover, tally.errors if tally else [])
        check("no request failed outside the failover", not outside,
              "%s Locust failures, %d listener/poster errors: %d of the %d kept within the failover (from the kill "
              "to 5 s after its rooms were served again), %d outside%s"
              % (locust["failures"], error_count, len(within), len(within) + len(outside), len(outside),
                 (": " + "; ".join(error[2] for error in outside[:3])) if outside else ""))
    else:
        check("no request failed", not locust["failures"] and not error_count,
              "%s Locust failures, %d listener/poster errors" % (locust["failures"], error_count))
    check("target of held polls reached", held and max(held) >= TARGET_REACHED_FRACTION * users,
          "peak %s held of %d listeners (at least %.0f%%)" % (max(held) if held else "no sample of",
                                                               users, TARGET_REACHED_FRACTION * 100))
    if tally is not None and tally.fatal:
        check("every load process ran to the end", False, tally.fatal)
    check("the machine was not saturated", not machine["machine_bound"],
          "every core busy in %d of %d burst seconds (at most %.0f%%)"
          % (machine["burst_seconds_saturated"], machine["burst_seconds"], MACHINE_BOUND_SHARE * 100))
    if tally is not None and tally.version_problem:
        check("one Locust version on every load host", False, tally.version_problem)
    servers = server_figures(samples, run_info)
    if len(servers) > 1:
        check("listeners held on every server", all(entry["held_polls_peak"] for entry in servers.values()),
              ", ".join("%s: %s" % (url, entry["held_polls_peak"]) for url, entry in servers.items()))
    check("latency is the server's, not the client's", client_bound is None,
          client_bound or ("client lag p99 %s within %.0f%% of the server's p99 or %.0f ms" %
                           (ms(lag.get("p99"), "%.1f ms"), CLIENT_LAG_SHARE * 100, CLIENT_LAG_FLOOR * 1000)))
    causes = load_host_causes(shares)
    if causes:
        check("every load worker's timed waits keep their deadline", False, "; ".join(causes))

    if judged_by_row and run_info["chaos"] == "cluster-failover":
        judged_by_row.append("no request failed outside the failover")
    if judged_by_row:
        for entry in checks:
            entry["note"] = entry["check"] not in judged_by_row
    return {
        "run": run_info, "machine": machine_description(), "machine_line": machine_line(),
        "passed": all(entry["passed"] or entry.get("note") for entry in checks), "checks": checks,
        "chaos": chaos,
        "client_bound": client_bound, "machine_check": machine, "warnings": [cpu["warning"]] if cpu["warning"] else [],
        "latency_figures_are": ("client-bound: " + client_bound) if client_bound else
        ("the server's, on a machine-bound run (every core busy in %d of %d burst seconds)"
         % (machine["burst_seconds_saturated"], machine["burst_seconds"])) if machine["machine_bound"]
        else "the server's",
        "wakeup_latency_s": latency, "client_lag_s": lag, "delivery": delivery,
        "posts": posts, "deliveries": deliveries, "final_cursors": final_ids, "cpu": cpu,
        "held_polls_peak": max(held) if held else None,
        "server_cpu_mean": sum(cpu_samples) / len(cpu_samples) if cpu_samples else None,
        "server_cpu_max": max(cpu_samples) if cpu_samples else None, "memory": memory, "locust": locust,
        "load_workers": tally.workers if tally else {}, "worker_shares": shares,
        "servers": servers, "clocks": clock_figures(tally), "cost_figures": costs,
        "proxy_cost": {"without": without_proxy["figures"], "with": costs,
                       "without_report": without_proxy["report_dir"], "without_passed": without_proxy["passed"]}
        if without_proxy else None,
        "under_bound": sum((worker.get("under_bound") or 0) for worker in (tally.workers if tally else {}).values()),
        "other_processes_cpu_mean": others_mean,
        "machine_contended": others_mean is not None and others_mean >= CONTENDED_PERCENT,
        "errors": tally.errors[:50] if tally else [], "error_count": error_count, "cluster": cluster,
    }, tally


def chaos_part(run_info, tally):
    """The fault's row (loadtests/faults.py) of a run with --chaos; None without."""
    record = run_info.get("chaos_record")
    if not run_info.get("chaos") or record is None:
        return None
    from loadtests.faults import chaos_row
    return chaos_row(run_info["chaos"], record, tally, record.get("probe_posts_accepted", ()),
                     record.get("probe_refusals", ()))


def chaos_detail(row):
    return ("%(signalled)d signalled, %(delivered)d delivered of %(owed)d owed over %(listeners)d listeners; "
            "posts refused %(refused)d, outcome unknown %(outcome_unknown)d, no answer %(no_answer)d" % row
            + "; time without service %s" % ("never back" if row["time_without_service_s"] is None
                                             else "%.2f s" % row["time_without_service_s"]))


def cluster_part(report_dir, run_info, tally, final_ids):
    """Each shard's share and, with --chaos, the failover's count (loadtests/cluster_load.py)."""
    if not run_info.get("cluster"):
        return None
    import json

    from loadtests.cluster_load import cluster_summary
    path = os.path.join(report_dir, "raw", "histories.json")
    histories = {}
    if os.path.exists(path):
        with open(path) as held:
            histories = json.load(held)
    return cluster_summary(run_info["cluster"], tally, final_ids, histories)


def failover_checks(check, failover, delivery):
    """With --chaos a failover is the point: losses the clients were told of are reported;
    a loss nobody was told of, a duplicate, or a failover that did not happen fails the run."""
    if failover is None:
        check("the failover happened", False, "the run has no failover record (no cluster?)")
        return
    check("the failover happened: master killed, its replica promoted",
          failover["promoted_is_master"] and not failover["error"],
          failover["error"] or "%s killed, %s promoted after %.1f s" % (
              failover["killed"], failover["promoted"], failover["promoted_after_s"] or 0))
    check("no accepted post lost silently, none duplicated",
          failover["lost"] == 0 and failover["duplicated"] == 0 and failover["out_of_order"] == 0
          and delivery["listeners"] > 0,
          "%(lost)d lost, %(signalled)d signalled (reset or missed), %(duplicated)d duplicated, %(out_of_order)d out "
          "of order, %(delivered)d delivered of %(judged)d owed" % failover)


# -- charts -------------------------------------------------------------------------------------------

def _what_ran(run):
    seed = run.get("schedule_seed")
    return ("%d listeners over %d room(s), %d posters (bursts of %d, mean gap %gs, %s), polls of %gs, %s, %gs run"
            % (run["users"], run["rooms"], run["posters"], run["burst_size"], run["burst_gap"],
               "schedule seed %d" % seed if seed else "unseeded schedule", run["poll_timeout"], run["server"],
               run["duration"]))


def _shade_stages(axis, stages):
    colours = {"ramp": "#eef3fb", "hold": "#f4f4f4", "bursts": "#fdf1e3", "drain": "#eef7ee", "ramp-down": "#f4f4f4"}
    total = stages[-1]["end"] if stages else 1
    for stage in stages or []:
        axis.axvspan(stage["start"], stage["end"], color=colours.get(stage["name"], "#f4f4f4"), zorder=0)
        if stage["end"] - stage["start"] < 0.08 * total:
            continue  # too narrow for its name; the caption lists the stages
        axis.text((stage["start"] + stage["end"]) / 2, 1.0, stage["name"], transform=axis.get_xaxis_transform(),
                  ha="center", va="bottom", fontsize=8, color="#5b6475")


def draw_charts(report_dir, summary, tally, samples):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run = summary["run"]
    origin = stage_origin(run)
    stages = run.get("stages")
    what, machine = _what_ran(run), summary["machine_line"]
    bound_note = (" CLIENT-BOUND (%s): these latencies are partly the load generator's own queueing."
                  % summary["client_bound"]) if summary["client_bound"] else ""
    charts = []
    t = np.array([row["time"] - origin for row in samples if "server_rss" in row])
    rows = [row for row in samples if "server_rss" in row]

    def save(fig, name, caption):
        fig.tight_layout()
        fig.savefig(os.path.join(report_dir, name), dpi=100)
        plt.close(fig)
        charts.append((name, caption))

    # 1. held polls
    fig, axis = plt.subplots(figsize=(9, 3.6))
    _shade_stages(axis, stages)
    held = np.array([np.nan if row.get("held_polls") is None else row["held_polls"] for row in rows], dtype=float)
    axis.plot(t, held, color="#1f5fbf", label="held polls (server /stats waiters)")
    if stages:
        xs = [value for stage in stages for value in (stage["start"], stage["end"])]
        ys = [stage["users"] - run["posters"] * bool(stage["users"]) for stage in stages for _ in (0, 1)]
        axis.plot(xs, ys, color="#888", linestyle="--", label="target listeners")
    axis.set_xlabel("seconds since the stages began")
    axis.set_ylabel("polls held")
    axis.legend(loc="lower center", fontsize=8)
    save(fig, "held_polls.png",
         "Held polls over time. %s. %s. Blue: polls the server holds right now (sum of /stats 'waiters' over its "
         "workers, sampled each second); dashed: the listeners the stage table asks for. Shaded bands are the "
         "stages (ramp, hold, bursts, drain, ramp-down); dips during bursts are listeners between two polls, "
         "and polls stay held after ramp-down until their timeout, as the server learns of a gone client "
         "only then." % (what, machine))

    seconds = sorted(tally.seconds.items()) if tally else []
    second_t = np.array([second + 0.5 - origin for second, _pair in seconds])

    def broken(values):
        """x and y with a gap (NaN) wherever seconds without deliveries lie between two points."""
        xs, ys = [], []
        for index, (x, y) in enumerate(zip(second_t, values)):
            if index and x - second_t[index - 1] > 1.5:
                xs.append(np.nan)
                ys.append(np.nan)
            xs.append(x)
            ys.append(y)
        return xs, ys

    # 2. latency percentiles over time
    fig, axis = plt.subplots(figsize=(9, 3.6))
    _shade_stages(axis, stages)
    if seconds:
        for q, colour in ((0.50, "#1f5fbf"), (0.95, "#e08a00"), (0.99, "#b3261e")):
            axis.plot(*broken([pair[0].percentile(q) * 1000 for _second, pair in seconds]), marker=".",
                      color=colour, label="server p%d" % round(q * 100))
        axis.plot(*broken([max(pair[1].percentile(0.99) * 1000, 0.001) for _second, pair in seconds]),
                  color="#555", linestyle="--", label="client lag p99")
        axis.set_yscale("log")
        axis.legend(fontsize=8)
    axis.set_xlabel("seconds since the stages began (by arrival time)")
    axis.set_ylabel("ms")
    save(fig, "latency_over_time.png",
         "Wake-up latency over time: for each second, p50 (blue), p95 (orange) and p99 (red) of the server's "
         "wake-up latency (the kernel's arrival time of the answer minus the message's server 'ts') over every "
         "message received in that second; dashed grey is the p99 of the client's own lag (user-space read "
         "minus kernel arrival), which must stay far below the red line for the red line to be the server's. "
         "A saw-tooth that climbs within each burst is a queue. %s. %s.%s" % (what, machine, bound_note))

    # 3. latency histogram
    fig, axis = plt.subplots(figsize=(9, 3.6))
    latency, lag = summary["wakeup_latency_s"], summary["client_lag_s"]
    if tally is not None and tally.latency.count:
        for histogram, colour, label in ((tally.latency, "#1f5fbf", "server wake-up latency"),
                                         (tally.lag, "#888", "client lag")):
            buckets = histogram.buckets()
            if not buckets:
                continue
            edges = np.array([edge * 1000 for edge, _count in buckets])
            counts = np.array([count for _edge, count in buckets], dtype=float)
            bins = np.logspace(np.log10(max(edges.min(), 0.001)), np.log10(max(edges.max(), 0.01)) + 0.01, 60)
            axis.hist(np.clip(edges, bins[0], bins[-1]), bins=bins, weights=counts, color=colour, label=label,
                      **({"alpha": 0.8} if histogram is tally.latency else {"histtype": "step", "linewidth": 1.2}))
        axis.set_xscale("log")
        for key, colour in (("p50", "#1b7f3b"), ("p95", "#e08a00"), ("p99", "#b3261e")):
            axis.axvline(latency[key] * 1000, color=colour, linestyle="--",
                         label="server %s %.1f ms" % (key, latency[key] * 1000))
        if lag.get("p99") is not None:
            axis.axvline(lag["p99"] * 1000, color="#555", linestyle=":",
                         label="client lag p99 %.1f ms" % (lag["p99"] * 1000))
        axis.legend(fontsize=8)
    axis.set_xlabel("ms (log scale)")
    axis.set_ylabel("deliveries")
    save(fig, "latency_histogram.png",
         "Wake-up latency histogram: every delivery of a held poll (%d), binned on a log scale from the run's "
         "HdrHistogram (3 significant digits); blue is the server's wake-up latency (kernel arrival minus "
         "'ts'), grey the client's lag (read minus kernel arrival) of the same deliveries; dashed lines are the "
         "server's p50, p95 and p99. Two blue humps are two regimes: messages that found their listener held, "
         "and messages that waited for it to come back. %s. %s.%s"
         % (latency.get("count") or 0, what, machine, bound_note))

    # 4. memory
    fig, axis = plt.subplots(figsize=(9, 3.6))
    _shade_stages(axis, stages)
    rss = np.array([np.nan if row.get("server_rss") is None else row["server_rss"] for row in rows], dtype=float)
    axis.plot(t, rss / 2 ** 20, color="#1f5fbf", label="server RSS, MiB (left axis)")
    axis.set_ylabel("server RSS, MiB")
    axis.set_xlabel("seconds since the stages began")
    idle = summary["memory"]["rss_idle"]
    if idle:
        # Only while (nearly) everyone is held: between two polls a listener still costs
        # memory but is not counted, which would inflate the quotient.
        steady = (held > 100) & (held >= 0.9 * np.nanmax(held)) if np.isfinite(held).any() else held > 100
        if stages:  # after ramp-down the server still counts polls of listeners that left
            steady &= t < stages[-1]["start"]
        per_poll = np.where(steady, (rss - idle) / np.where(held > 0, held, 1) / 1024.0, np.nan)
        other = axis.twinx()
        other.plot(t, per_poll, color="#b3261e", linestyle="--", marker=".", label="KiB per held poll (right axis)")
        other.set_ylabel("KiB per held poll")
        other.set_ylim(0, max(1.0, 1.6 * float(np.nanmax(per_poll)) if np.isfinite(per_poll).any() else 1.0))
        other.legend(loc="lower right", fontsize=8)
    axis.legend(loc="lower left", fontsize=8)
    save(fig, "memory.png",
         "Server memory: blue is the RSS summed over the server's serving processes (psutil, each second); red "
         "is (RSS - idle RSS before anyone connected) / held polls, shown while at least 90%% of the peak (and "
         "over 100) polls are held. "
         "%s. %s." % (what, machine))

    # 5. posts and deliveries per second
    fig, axis = plt.subplots(figsize=(9, 3.6))
    _shade_stages(axis, stages)
    end = stages[-1]["end"] if stages else 1
    bins = np.arange(0, int(end) + 2)
    posts_t = np.array([post[2] for post in (tally.posts if tally else [])]) - origin
    axis.bar(second_t - 0.5, [pair[0].count for _second, pair in seconds], width=1.0, align="edge",
             color="#9bb8e8", label="deliveries/s (held polls' messages, by arrival)")
    axis.set_ylabel("deliveries per second")
    axis.set_xlabel("seconds since the stages began")
    other = axis.twinx()
    other.hist(posts_t, bins=bins, histtype="step", color="#b3261e", label="posts/s (accepted)")
    other.set_ylabel("posts per second")
    axis.legend(loc="upper left", fontsize=8)
    other.legend(loc="upper right", fontsize=8)
    save(fig, "throughput.png",
         "Posts and deliveries per second: red counts posts the server accepted (by their 'ts'), blue counts "
         "messages that reached a held poll (by kernel arrival time); one post in a room of L listeners is L "
         "deliveries. Messages fetched by the catch-up at ramp-down are not in blue. %s. %s." % (what, machine))

    # 6. CPU
    fig, axis = plt.subplots(figsize=(9, 3.2))
    _shade_stages(axis, stages)
    machine_check = summary["machine_check"]
    for second in machine_check["saturated_seconds"]:
        axis.axvspan(second - 0.5, second + 0.5, color="#f3c7c3", zorder=0.5, linewidth=0)
    plotted = [("server_cpu", "#1f5fbf", "server"), ("client_cpu", "#e08a00", "load generator")]
    if any(row.get("proxy_cpu") is not None for row in rows):
        plotted.append(("proxy_cpu", "#2e8b57", "nginx"))
    for key, colour, label in plotted:
        axis.plot(t, [np.nan if row.get(key) is None else row[key] for row in rows], color=colour, label=label)
    others = [np.nan if row.get("machine_cpu") is None else
              max(0.0, row["machine_cpu"] - measured_cpu(row))
              for row in rows]
    axis.plot(t, others, color="#888", linewidth=0.8, label="every other process")
    axis.axhline(machine_check["busy_mark_percent"], color="#b3261e", linestyle=":",
                 label="%.0f%% of all %d cores" % (MACHINE_BUSY_SHARE * 100, machine_check["cores"]))
    axis.set_ylabel("% of one core")
    axis.set_xlabel("seconds since the stages began")
    axis.legend(fontsize=8, ncol=2)
    cpu = summary["cpu"]
    save(fig, "cpu.png",
         "CPU each second, in %% of one core, read from /proc: the server (summed over its serving processes), "
         "the load generator (Locust master and workers), nginx when it is in front, and every other process "
         "(all cores' busy time minus those). Pink seconds are machine-saturated: everything together used at "
         "least %.0f%% of all cores (%d of the %d burst seconds%s). Over the run the load generator used %s s "
         "of CPU against the server's %s s (%s). %s. %s."
         % (MACHINE_BUSY_SHARE * 100, machine_check["burst_seconds_saturated"], machine_check["burst_seconds"],
            ": MACHINE-BOUND, so the latencies include waiting for a core" if machine_check["machine_bound"] else "",
            _seconds(cpu["client_cpu_s"]), _seconds(cpu["server_cpu_s"]),
            "ratio %.2f" % cpu["client_over_server"] if cpu["client_over_server"] is not None else "no ratio",
            what, machine))
    return charts


def _seconds(value):
    return "-" if value is None else "%.1f" % value


def build_report(report_dir, run_info, samples, cursors):
    summary, tally = build_summary(report_dir, run_info, samples, cursors)
    write_json(os.path.join(report_dir, "samples.json"), samples)
    charts = draw_charts(report_dir, summary, tally, samples)
    summary["charts"] = [name for name, _caption in charts]
    write_json(os.path.join(report_dir, "summary.json"), summary)

    lat, lag, mem, cpu = summary["wakeup_latency_s"], summary["client_lag_s"], summary["memory"], summary["cpu"]
    rows = [("result", "PASSED" if summary["passed"] else "FAILED", "pass" if summary["passed"] else "fail")]
    rows += [(c["check"], ("ok: " if c["passed"] else "note (under the fault): " if c.get("note") else "FAILED: ")
              + c["detail"], "" if c["passed"] or c.get("note") else "fail") for c in summary["checks"]]
    if summary.get("chaos"):
        from loadtests.faults import refused_text
        row = summary["chaos"]
        rows += [("CHAOS=%s" % row["fault"], "lost silently %s, signalled %s, duplicated %s, refused %s, time "
                  "without service %s: %s" % (row["lost_silently"], row["signalled"], row["duplicated"],
                                              refused_text(row), "never" if row["time_without_service_s"] is None
                                              else "%.1f s" % row["time_without_service_s"], row["verdict"]),
                  "" if row["passed"] else "fail")]
    rows += [("held polls, peak", summary["held_polls_peak"], ""),
             ("posts / deliveries", "%d / %d (%d of them fetched by the catch-up at ramp-down)"
              % (summary["posts"], summary["deliveries"], summary["delivery"]["caught_up_at_stop"]), ""),
             ("server wake-up latency p50 / p95 / p99 / max",
              " / ".join(ms(lat.get(k), "%.1f ms") for k in ("p50", "p95", "p99", "max")), ""),
             ("client lag p50 / p95 / p99 / max",
              " / ".join(ms(lag.get(k), "%.1f ms") for k in ("p50", "p95", "p99", "max")), ""),
             ("latency figures are", summary["latency_figures_are"], ""),
             ("CPU: load generator / server", _cpu_line(cpu), ""),
             ("server RSS idle / holding", "-" if not mem["rss_idle"] else "%.1f / %.1f MiB"
              % (mem["rss_idle"] / 2 ** 20, mem["rss_holding"] / 2 ** 20), ""),
             ("memory per held poll", "-" if mem["bytes_per_held_poll"] is None
              else "%.1f KiB" % (mem["bytes_per_held_poll"] / 1024), ""),
             ("machine-saturated burst seconds", "%d of %d" % (summary["machine_check"]["burst_seconds_saturated"],
                                                               summary["machine_check"]["burst_seconds"]), "")]
    rows += [row for row in summary_lines(summary)]
    if summary.get("proxy_cost"):
        cost = summary["proxy_cost"]
        rows += [("proxy cost: " + label, "%s without (%s) / %s with %s %s" % (
            before, os.path.basename(cost["without_report"]), after, run_info.get("proxy"), unit), "")
            for label, before, after, unit in table_rows(cost["without"], cost["with"])]
    notes = ["Latency figures are client-bound: %s." % summary["client_bound"]] if summary["client_bound"] else []
    notes += ["Warning: %s." % warning for warning in summary["warnings"]]
    if summary["machine_check"]["machine_bound"]:
        notes.append("Machine-bound: in %d of %d burst seconds server, load generator and everything else together "
                     "used at least %.0f%% of all cores, so answers also waited for a core; the latencies are an "
                     "upper bound of the server's." % (summary["machine_check"]["burst_seconds_saturated"],
                                                        summary["machine_check"]["burst_seconds"],
                                                        MACHINE_BUSY_SHARE * 100))
    if summary["machine_contended"]:
        notes.append("Other processes used %.0f%% of a core on average during the run: server and load generator "
                     "competed with them for the CPU, so latency is worse than on a quiet machine."
                     % summary["other_processes_cpu_mean"])
    if run_info.get("interrupted"):
        notes.append("The run was interrupted: this is the partial report of what happened until then.")
    write_html(os.path.join(report_dir, "report.html"), "Chattle load run", "%s. %s" % (
        _what_ran(run_info), summary["machine_line"]), rows, charts, notes=notes,
        links=[("locust.html", "Locust's own report"), ("summary.json", "summary.json"),
               ("locust_stats.csv", "Locust CSV"), ("samples.json", "per-second samples")])
    return summary


def summary_lines(summary):
    """(name, value, "") rows of the multi-host figures: each server, each clock offset, each load worker."""
    from loadtests.cluster_load import shard_lines
    rows = shard_lines(summary, summary.get("run") or {})
    for url, entry in summary.get("servers", {}).items():
        rows.append(("server " + url, "held polls peak %s, RSS %s MiB idle / %s MiB at the peak, %s per held poll"
                     % (entry["held_polls_peak"], _mib(entry["rss_idle"]), _mib(entry["rss_at_peak"]),
                        "-" if entry["bytes_per_held_poll"] is None else "%.1f KiB" % (entry["bytes_per_held_poll"]
                                                                                     / 1024)), ""))
    for clock in summary.get("clocks", []):
        rows.append(("clock %s/%s" % (clock["host"], clock["pid"]), "%s is %+.1f ms +- %.2f ms ahead of %s's ts clock"
                     % (clock["host"], clock["offset"] * 1000, clock["bound"] * 1000, clock["server"]), ""))
    if summary.get("clocks"):
        rows.append(("under the bound", "%d latencies shorter than their clock bound (recorded as the bound)"
                     % summary.get("under_bound", 0), ""))
    for worker_id, share in summary.get("worker_shares", {}).items():
        rows.append(("load worker %s" % worker_id[-8:], "pid %s on %s: %d listeners (%.0f%%), %d deliveries (%.0f%%), "
                     "%.1f s CPU, wake-up p50 %s, client lag p99 %s%s%s%s" % (
                         share["pid"], share["host"], share["listeners"], 100 * share["listener_share"],
                         share["deliveries"], 100 * share["delivery_share"], share["cpu_seconds"] or 0,
                         ms(share["latency"].get("p50"), "%.1f ms"), ms((share.get("lag") or {}).get("p99"), "%.1f ms"),
                         ", wall clock under libfaketime %s (%s)" % (share["clock_preload"]["spec"],
                                                                     monotonic_fix_words(share["clock_preload"]))
                         if share.get("clock_preload") else "",
                                       HELD_PATHS.get(share.get("held_path"), ""),
                                       ", LOST: %d listeners lost contact" % share["lost_contact"]
                                       if share["lost"] else ""), ""))
    return rows


def _mib(value):
    return "-" if value is None else "%.1f" % (value / 2 ** 20)


def _cpu_line(cpu):
    if cpu["client_cpu_s"] is None or cpu["server_cpu_s"] is None:
        return "load generator %s s, server %s s" % (_seconds(cpu["client_cpu_s"]), _seconds(cpu["server_cpu_s"]))
    ratio = "-" if cpu["client_over_server"] is None else "%.2f" % cpu["client_over_server"]
    return ("%.1f s / %.1f s = %s (Locust %.1f s + orchestrator %s s); per delivery %s us / %s us%s"
            % (cpu["client_cpu_s"], cpu["server_cpu_s"], ratio, cpu["locust_cpu_s"],
               _seconds(cpu.get("orchestrator_cpu_s")), _whole(cpu["client_us_per_delivery"]),
               _whole(cpu["server_us_per_delivery"]), "  WARNING: over %.2f" % CLIENT_CPU_SHARE
               if cpu.get("warning") else ""))


def _whole(value):
    return "-" if value is None else "%.0f" % value


def print_summary(summary, report_dir):
    lat, lag, mem, delivery = (summary["wakeup_latency_s"], summary["client_lag_s"], summary["memory"],
                               summary["delivery"])
    machine = summary["machine_check"]
    print("=" * 78)
    print("Chattle load run: %s" % ("PASSED" if summary["passed"] else "FAILED"))
    print("  %s" % _what_ran(summary["run"]))
    print("  on %s" % summary["machine_line"])
    print("  held polls peak      %s of %d listeners" % (summary["held_polls_peak"], summary["run"]["users"]))
    print("  posts / deliveries   %d / %d" % (summary["posts"], summary["deliveries"]))
    print("  server wake-up ms    p50 %s  p95 %s  p99 %s  max %s  (kernel arrival - ts)"
          % tuple(ms(lat.get(key), "%.1f") for key in ("p50", "p95", "p99", "max")))
    print("  client lag ms        p50 %s  p95 %s  p99 %s  max %s  (read - kernel arrival)%s"
          % (*(ms(lag.get(key), "%.1f") for key in ("p50", "p95", "p99", "max")),
             "  CLIENT-BOUND" if summary["client_bound"] else ""))
    print("  CPU                  %s" % _cpu_line(summary["cpu"]))
    print("  machine              every core busy in %d of %d burst seconds%s"
          % (machine["burst_seconds_saturated"], machine["burst_seconds"],
             " (MACHINE-BOUND: latencies include waiting for a core)" if machine["machine_bound"] else ""))
    print("  delivery             %(lost)d lost, %(duplicated)d duplicated, %(out_of_order)d out of order; "
          "%(gave_up)d listener(s) gave up" % delivery)
    if mem["bytes_per_held_poll"] is not None:
        print("  server RSS           %.1f MiB idle, %.1f MiB holding %d polls: %.1f KiB per held poll"
              % (mem["rss_idle"] / 2 ** 20, mem["rss_holding"] / 2 ** 20, mem["held_at_peak"],
                 mem["bytes_per_held_poll"] / 1024))
    if summary.get("other_processes_cpu_mean") is not None:
        print("  other processes CPU  mean %.0f%% of a core%s" % (summary["other_processes_cpu_mean"],
              " (CONTENDED machine: latency is worse than on a quiet one)" if summary["machine_contended"] else ""))
    for name, value, _kind in summary_lines(summary):
        print("  %-20s %s" % (name, value))
    print("  Locust requests      %s, failures %s" % (summary["locust"]["requests"], summary["locust"]["failures"]))
    for entry in summary["checks"]:
        print("  [%s] %s: %s" % ("ok" if entry["passed"] else "note" if entry.get("note") else "FAIL",
                                 entry["check"], entry["detail"]))
    if summary.get("chaos"):
        from loadtests.faults import table_lines
        print("  CHAOS:")
        for line in table_lines([summary["chaos"]]):
            print("    " + line)
    for warning in summary.get("warnings", []):
        print("  [warning] %s" % warning)
    print("  report               %s" % os.path.join(report_dir, "report.html"))
    print("=" * 78)
