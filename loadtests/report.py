"""Turn one load run into its report: summary.json, PNG charts with captions, report.html.

Inputs: the per-second samples of run.py, the raw files each Locust process wrote
(raw/locust-<pid>.json: every latency at full precision, every listener's ledger, every
post), the rooms' final cursors, and Locust's own CSV. Figures go through
bench/measures.py so they mean what they mean everywhere else.
"""

import csv
import glob
import json
import os

from bench.measures import DeliveryLedger, delivery_summary, latency_summary, memory_per_connection
from reports.page import machine_description, machine_line, write_html, write_json

CPU_BOUND_PERCENT = 90.0      # Locust's own warning threshold
CPU_BOUND_SECONDS = 3         # consecutive samples at or above it
TARGET_REACHED_FRACTION = 0.95
CONTENDED_PERCENT = 50.0      # other processes' mean CPU, in % of one core, that makes figures suspect


def load_raw(raw_dir):
    merged = {"listeners": [], "posts": [], "errors": [], "received_at": [], "latency": [], "files": 0}
    for path in sorted(glob.glob(os.path.join(raw_dir, "locust-*.json"))):
        with open(path) as raw:
            data = json.load(raw)
        merged["files"] += 1
        for key in ("listeners", "posts", "errors", "received_at", "latency"):
            merged[key].extend(data[key])
    return merged


def ledger_of(entry):
    ledger = DeliveryLedger(entry["start"])
    ledger.next_expected = entry["next_expected"]
    ledger.received = entry["received"]
    ledger.duplicated = entry["duplicated"]
    ledger.out_of_order = entry["out_of_order"]
    ledger.missed_reported = entry["missed_reported"]
    ledger._gaps = set(entry["gaps"])
    return ledger


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


def client_bound(report_dir, samples):
    """Why the load generator, not the server, may have limited the figures (None: it did not)."""
    reasons = []
    log_path = os.path.join(report_dir, "locust.log")
    if os.path.exists(log_path):
        with open(log_path, errors="replace") as log:
            warnings = sum(1 for line in log if "CPU usage above" in line)
        if warnings:
            reasons.append("Locust warned %d time(s) 'CPU usage above 90%%'" % warnings)
    run = longest = 0
    for row in samples:
        busy = (row.get("client_cpu_max_process") or 0) >= CPU_BOUND_PERCENT
        run = run + 1 if busy else 0
        longest = max(longest, run)
    if longest >= CPU_BOUND_SECONDS:
        reasons.append("a Locust process used >= %.0f%% CPU for %d s in a row" % (CPU_BOUND_PERCENT, longest))
    return "; ".join(reasons) or None


def memory_figures(samples, run_info):
    """Idle RSS before anyone connected, and RSS with the most polls held before the first post."""
    started = run_info.get("locust_started") or 0
    idle = [row["server_rss"] for row in samples if row.get("server_rss") and row["time"] < started]
    hold_end = started + next((s["end"] for s in run_info.get("stages") or [] if s["name"] == "hold"), 0)
    holding = [row for row in samples if row.get("held_polls") and row.get("server_rss") and row["time"] < hold_end]
    if not idle or not holding:
        return {"rss_idle": None, "rss_holding": None, "held_at_peak": None, "bytes_per_held_poll": None}
    peak = max(holding, key=lambda row: (row["held_polls"], row["time"]))
    return {"rss_idle": min(idle), "rss_holding": peak["server_rss"], "held_at_peak": peak["held_polls"],
            "bytes_per_held_poll": memory_per_connection(min(idle), peak["server_rss"], peak["held_polls"])}


def build_summary(report_dir, run_info, samples, cursors):
    raw = load_raw(os.path.join(report_dir, "raw"))
    ledgers = [ledger_of(entry) for entry in raw["listeners"]]
    room_of = {id(ledger): entry["room"] for ledger, entry in zip(ledgers, raw["listeners"])}
    last_posted = {}
    for room, message_id, _ts in raw["posts"]:
        last_posted[room] = max(last_posted.get(room, 0), message_id)
    final_ids = dict(last_posted, **cursors)  # the server's word wins; posts are the fallback
    delivery = delivery_summary(ledgers, lambda ledger: final_ids.get(room_of[id(ledger)], ledger.next_expected - 1))
    delivery["missed_reported"] = sum(ledger.missed_reported for ledger in ledgers)
    latency = latency_summary(raw["latency"])
    held = [row["held_polls"] for row in samples if row.get("held_polls") is not None]
    cpu = [row["server_cpu"] for row in samples if row.get("server_cpu") is not None]
    bound = client_bound(report_dir, samples)
    others = [row["machine_cpu"] - (row.get("server_cpu") or 0) - (row.get("client_cpu") or 0)
              for row in samples if row.get("machine_cpu") is not None]
    others_mean = max(0.0, sum(others) / len(others)) if others else None
    locust = locust_totals(report_dir)
    memory = memory_figures(samples, run_info)
    users = run_info["users"]

    checks = []

    def check(name, passed, detail):
        checks.append({"check": name, "passed": bool(passed), "detail": detail})

    check("run completed", not run_info.get("run_error") and raw["files"] > 0,
          run_info.get("run_error") or "%d Locust process(es) reported" % raw["files"])
    check("every message delivered once, in order", delivery["complete"] and delivery["listeners"] > 0,
          "%(lost)d lost, %(duplicated)d duplicated, %(out_of_order)d out of order over %(listeners)d listeners"
          % delivery)
    check("messages were posted and delivered", len(raw["posts"]) > 0 and latency["count"] > 0,
          "%d posts, %d deliveries" % (len(raw["posts"]), latency["count"]))
    check("no request failed", not locust["failures"] and not raw["errors"],
          "%s Locust failures, %d listener/poster errors" % (locust["failures"], len(raw["errors"])))
    if held:
        check("target of held polls reached", max(held) >= TARGET_REACHED_FRACTION * users,
              "peak %d held of %d listeners" % (max(held), users))
    check("load generator not CPU-bound", bound is None,
          bound or "Locust stayed below %.0f%% CPU per process" % CPU_BOUND_PERCENT)

    return {
        "run": run_info, "machine": machine_description(), "machine_line": machine_line(),
        "passed": all(entry["passed"] for entry in checks), "checks": checks,
        "client_bound": bound,
        "latency_figures_are": "client-bound (the load generator ran out of CPU)" if bound else "the server's",
        "wakeup_latency_s": latency, "delivery": delivery,
        "posts": len(raw["posts"]), "deliveries": latency["count"], "final_cursors": final_ids,
        "held_polls_peak": max(held) if held else None, "server_cpu_mean": sum(cpu) / len(cpu) if cpu else None,
        "server_cpu_max": max(cpu) if cpu else None, "memory": memory, "locust": locust,
        "other_processes_cpu_mean": others_mean,
        "machine_contended": others_mean is not None and others_mean >= CONTENDED_PERCENT,
        "errors": raw["errors"][:50], "error_count": len(raw["errors"]),
    }, raw


# -- charts -------------------------------------------------------------------------------------------

def _what_ran(run):
    return ("%d listeners over %d room(s), %d posters (bursts of %d, mean gap %gs), polls of %gs, %s, %gs run"
            % (run["users"], run["rooms"], run["posters"], run["burst_size"], run["burst_gap"],
               run["poll_timeout"], run["server"], run["duration"]))


def _shade_stages(axis, stages):
    colours = {"ramp": "#eef3fb", "hold": "#f4f4f4", "bursts": "#fdf1e3", "drain": "#eef7ee", "ramp-down": "#f4f4f4"}
    total = stages[-1]["end"] if stages else 1
    for stage in stages or []:
        axis.axvspan(stage["start"], stage["end"], color=colours.get(stage["name"], "#f4f4f4"), zorder=0)
        if stage["end"] - stage["start"] < 0.08 * total:
            continue  # too narrow for its name; the caption lists the stages
        axis.text((stage["start"] + stage["end"]) / 2, 1.0, stage["name"], transform=axis.get_xaxis_transform(),
                  ha="center", va="bottom", fontsize=8, color="#5b6475")


def draw_charts(report_dir, summary, raw, samples):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run = summary["run"]
    origin = run.get("locust_started") or run["started"]
    stages = run.get("stages")
    what, machine = _what_ran(run), summary["machine_line"]
    bound_note = (" The load generator was CPU-bound (%s): latency here is the client's limit, not the server's."
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
    axis.set_xlabel("seconds since Locust started")
    axis.set_ylabel("polls held")
    axis.legend(loc="lower center", fontsize=8)
    save(fig, "held_polls.png",
         "Held polls over time. %s. %s. Blue: polls the server holds right now (sum of /stats 'waiters' over its "
         "workers, sampled each second); dashed: the listeners the stage table asks for. Shaded bands are the "
         "stages (ramp, hold, bursts, drain, ramp-down); dips during bursts are listeners between two polls, "
         "and polls stay held after ramp-down until their timeout, as the server learns of a gone client "
         "only then." % (what, machine))

    received_at = np.array(raw["received_at"]) - origin
    latency_ms = np.array(raw["latency"]) * 1000.0

    # 2. latency percentiles over time
    fig, axis = plt.subplots(figsize=(9, 3.6))
    _shade_stages(axis, stages)
    if latency_ms.size:
        seconds = np.floor(received_at).astype(int)
        order = np.argsort(seconds, kind="stable")
        seconds, values = seconds[order], latency_ms[order]
        edges = np.flatnonzero(np.diff(seconds)) + 1
        xs, per = [], {50: [], 95: [], 99: []}
        for second, chunk in zip(np.split(seconds, edges), np.split(values, edges)):
            if xs and second[0] + 0.5 - xs[-1] > 1.5:  # no deliveries in between: break the line
                xs.append(np.nan)
                for q in per:
                    per[q].append(np.nan)
            xs.append(second[0] + 0.5)
            for q in per:
                per[q].append(np.percentile(chunk, q))
        for q, colour in ((50, "#1f5fbf"), (95, "#e08a00"), (99, "#b3261e")):
            axis.plot(xs, per[q], marker=".", color=colour, label="p%d" % q)
        axis.set_yscale("log")
        axis.legend(fontsize=8)
    axis.set_xlabel("seconds since Locust started (by receive time)")
    axis.set_ylabel("wake-up latency, ms")
    save(fig, "latency_over_time.png",
         "Wake-up latency percentiles over time: for each second, p50 (blue), p95 (orange) and p99 (red) of "
         "receive time minus the message's server 'ts', over every message every listener received in that "
         "second. %s. %s.%s" % (what, machine, bound_note))

    # 3. latency histogram
    fig, axis = plt.subplots(figsize=(9, 3.6))
    if latency_ms.size:
        low = max(0.01, latency_ms[latency_ms > 0].min() if (latency_ms > 0).any() else 0.01)
        bins = np.logspace(np.log10(low), np.log10(max(latency_ms.max(), low * 10)), 60)
        axis.hist(np.clip(latency_ms, low, None), bins=bins, color="#1f5fbf")
        axis.set_xscale("log")
        lat = summary["wakeup_latency_s"]
        for key, colour in (("p50", "#1b7f3b"), ("p95", "#e08a00"), ("p99", "#b3261e")):
            axis.axvline(lat[key] * 1000, color=colour, linestyle="--", label="%s %.1f ms" % (key, lat[key] * 1000))
        axis.legend(fontsize=8)
    axis.set_xlabel("wake-up latency, ms (log scale)")
    axis.set_ylabel("deliveries")
    save(fig, "latency_histogram.png",
         "Wake-up latency histogram: every delivery of the run (%d), binned on a log scale; dashed lines are "
         "p50, p95 and p99. %s. %s.%s" % (summary["deliveries"], what, machine, bound_note))

    # 4. memory
    fig, axis = plt.subplots(figsize=(9, 3.6))
    _shade_stages(axis, stages)
    rss = np.array([np.nan if row.get("server_rss") is None else row["server_rss"] for row in rows], dtype=float)
    axis.plot(t, rss / 2 ** 20, color="#1f5fbf", label="server RSS, MiB (left axis)")
    axis.set_ylabel("server RSS, MiB")
    axis.set_xlabel("seconds since Locust started")
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
    end = stages[-1]["end"] if stages else (received_at.max() if received_at.size else 1)
    bins = np.arange(0, int(end) + 2)
    posts_t = np.array([ts for _room, _id, ts in raw["posts"]]) - origin
    axis.hist(received_at, bins=bins, histtype="step", color="#1f5fbf", label="deliveries/s (messages received)")
    axis.set_ylabel("deliveries per second")
    axis.set_xlabel("seconds since Locust started")
    other = axis.twinx()
    other.hist(posts_t, bins=bins, histtype="step", color="#b3261e", label="posts/s (accepted)")
    other.set_ylabel("posts per second")
    axis.legend(loc="upper left", fontsize=8)
    other.legend(loc="upper right", fontsize=8)
    save(fig, "throughput.png",
         "Posts and deliveries per second: red counts posts the server accepted (by their 'ts'), blue counts "
         "messages listeners received (by receive time); one post in a room of L listeners is L deliveries. "
         "%s. %s." % (what, machine))

    # 6. CPU
    fig, axis = plt.subplots(figsize=(9, 3.0))
    _shade_stages(axis, stages)
    for key, colour, label in (("server_cpu", "#1f5fbf", "server CPU %"), ("client_cpu", "#e08a00", "Locust CPU %")):
        axis.plot(t, [np.nan if row.get(key) is None else row[key] for row in rows], color=colour, label=label)
    others = [np.nan if row.get("machine_cpu") is None else
              max(0.0, row["machine_cpu"] - (row.get("server_cpu") or 0) - (row.get("client_cpu") or 0))
              for row in rows]
    axis.plot(t, others, color="#888", linewidth=0.8, label="every other process on the machine")
    axis.axhline(CPU_BOUND_PERCENT, color="#b3261e", linestyle=":", label="client-bound threshold")
    axis.set_ylabel("% of one core")
    axis.set_xlabel("seconds since Locust started")
    axis.legend(fontsize=8)
    save(fig, "cpu.png",
         "CPU of the server (summed over its serving processes) and of the Locust processes, in %% of one core, "
         "each second; grey is the rest of the machine's CPU use (all cores, minus those two). Server and load "
         "generator share this machine's cores; a Locust process at the dotted "
         "line makes the latency figures client-bound. %s. %s." % (what, machine))
    return charts


def build_report(report_dir, run_info, samples, cursors):
    summary, raw = build_summary(report_dir, run_info, samples, cursors)
    write_json(os.path.join(report_dir, "samples.json"), samples)
    charts = draw_charts(report_dir, summary, raw, samples)
    summary["charts"] = [name for name, _caption in charts]
    write_json(os.path.join(report_dir, "summary.json"), summary)

    lat, mem = summary["wakeup_latency_s"], summary["memory"]

    def ms(value):
        return "-" if value is None else "%.1f ms" % (value * 1000)
    rows = [("result", "PASSED" if summary["passed"] else "FAILED", "pass" if summary["passed"] else "fail")]
    rows += [(c["check"], ("ok: " if c["passed"] else "FAILED: ") + c["detail"], "" if c["passed"] else "fail")
             for c in summary["checks"]]
    rows += [("held polls, peak", summary["held_polls_peak"], ""),
             ("posts / deliveries", "%d / %d" % (summary["posts"], summary["deliveries"]), ""),
             ("wake-up latency p50 / p95 / p99 / max", " / ".join(ms(lat[k]) for k in ("p50", "p95", "p99", "max"))
              + ("  (client-bound)" if summary["client_bound"] else ""), ""),
             ("server RSS idle / holding", "-" if not mem["rss_idle"] else "%.1f / %.1f MiB"
              % (mem["rss_idle"] / 2 ** 20, mem["rss_holding"] / 2 ** 20), ""),
             ("memory per held poll", "-" if mem["bytes_per_held_poll"] is None
              else "%.1f KiB" % (mem["bytes_per_held_poll"] / 1024), ""),
             ("server CPU mean / max", "-" if summary["server_cpu_mean"] is None
              else "%.0f%% / %.0f%%" % (summary["server_cpu_mean"], summary["server_cpu_max"]), "")]
    notes = ["Latency figures are client-bound: %s." % summary["client_bound"]] if summary["client_bound"] else []
    if summary["machine_contended"]:
        notes.append("Other processes used %.0f%% of a core on average during the run: server and load generator "
                     "competed with them for the CPU, so latency is worse than on a quiet machine."
                     % summary["other_processes_cpu_mean"])
    write_html(os.path.join(report_dir, "report.html"), "Chattle load run", "%s. %s" % (
        _what_ran(run_info), summary["machine_line"]), rows, charts, notes=notes,
        links=[("locust.html", "Locust's own report"), ("summary.json", "summary.json"),
               ("locust_stats.csv", "Locust CSV"), ("samples.json", "per-second samples")])
    return summary


def print_summary(summary, report_dir):
    lat, mem, delivery = summary["wakeup_latency_s"], summary["memory"], summary["delivery"]

    def ms(value):
        return "-" if value is None else "%.1f" % (value * 1000)
    print("=" * 78)
    print("Chattle load run: %s" % ("PASSED" if summary["passed"] else "FAILED"))
    print("  %s" % _what_ran(summary["run"]))
    print("  on %s" % summary["machine_line"])
    print("  held polls peak      %s of %d listeners" % (summary["held_polls_peak"], summary["run"]["users"]))
    print("  posts / deliveries   %d / %d" % (summary["posts"], summary["deliveries"]))
    print("  wake-up latency ms   p50 %s  p95 %s  p99 %s  max %s%s"
          % (ms(lat["p50"]), ms(lat["p95"]), ms(lat["p99"]), ms(lat["max"]),
             "  (CLIENT-BOUND)" if summary["client_bound"] else ""))
    print("  delivery             %(lost)d lost, %(duplicated)d duplicated, %(out_of_order)d out of order" % delivery)
    if mem["bytes_per_held_poll"] is not None:
        print("  server RSS           %.1f MiB idle, %.1f MiB holding %d polls: %.1f KiB per held poll"
              % (mem["rss_idle"] / 2 ** 20, mem["rss_holding"] / 2 ** 20, mem["held_at_peak"],
                 mem["bytes_per_held_poll"] / 1024))
    if summary["server_cpu_mean"] is not None:
        print("  server CPU           mean %.0f%%, max %.0f%% of a core"
              % (summary["server_cpu_mean"], summary["server_cpu_max"]))
    if summary.get("other_processes_cpu_mean") is not None:
        print("  other processes CPU  mean %.0f%% of a core%s" % (summary["other_processes_cpu_mean"],
              " (CONTENDED machine: latency is worse than on a quiet one)" if summary["machine_contended"] else ""))
    print("  Locust requests      %s, failures %s" % (summary["locust"]["requests"], summary["locust"]["failures"]))
    for entry in summary["checks"]:
        print("  [%s] %s: %s" % ("ok" if entry["passed"] else "FAIL", entry["check"], entry["detail"]))
    print("  report               %s" % os.path.join(report_dir, "report.html"))
    print("=" * 78)
