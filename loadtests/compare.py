"""`make load BASE=<rev>`: the same seeded load against a base revision and this tree,
round by round, and a verdict: worse, unchanged or better, beyond the measured noise.

The base is checked out into a temporary git worktree (harness/sides.py, as `make
regress BASE=` does; removed at the end, also on failure, Ctrl-C or SIGTERM). Base and
head ("this tree") are run in rounds, each round's order drawn at random (seeded, printed),
at least ROUNDS and more until the stopping rule says enough (loadtests/stopping.py),
every run a complete `make load` on a freshly started server:
the base's server code from its worktree, head's from a copy of this tree beside it (the
same path length: a server's memory depends on it), and this tree's load client and
seeded schedule for both (the same listeners, rooms and bursts). CHATTLE_BENCH_*
variables of the environment (and --head-env) reach head's servers only.

Per figure (server CPU per delivery, wake-up p50 and p99, memory per held poll) each
round gives a ratio head / base; their geometric mean and a seeded bootstrap interval,
widened at few rounds to Student's t interval
(instruments/measures.py's ratio_interval) make the difference. A figure is worse when the
whole interval lies above its threshold (5 % CPU and memory, 10 % latency percentiles),
better when it lies below minus the threshold. A message lost, duplicated or out of
order in head is a regression whatever the figures. A round whose run is not valid
(it failed a validity check, or the machine was saturated) makes the comparison
impossible rather than wrong.

Exit status: 0 unchanged or better, 1 worse, 2 could not compare (the reason is printed).
"""

import argparse
import math
import os
import random
import sys
import time

from harness.processes import LOOPBACK, ROOT, Process, free_port, wait_until
from harness.sides import (
    BaseCheckout,
    Unmeasured,
    assignments,
    base_and_head,
    copy_of_this_tree,
    in_random_order,
    parse_head_env,
    scratch_directory,
)
from instruments import history
from instruments.canary import canary_line, canary_moved, read_canary
from instruments.measures import LatencyHistogram, ms, percentile, ratio_interval
from instruments.page import REPORTS_ROOT, machine_line, new_report_dir, write_html, write_json
from instruments.provenance import GitFailed, git, provenance, without_bench_environment
from loadtests import calibration, compare_summary
from loadtests.options import COMPARE, add_to_parser
from loadtests.stopping import look_confidence, looks, why_stop

WORSE_OR_NOT = {0: "UNCHANGED", 1: "WORSE", 2: "COULD NOT COMPARE"}
UNCHANGED, WORSE, CANNOT_COMPARE = 0, 1, 2
BOOTSTRAP_SEED = 13       # the same rounds always give the same interval, so the same verdict
CONFIDENCE = 0.95
ROUND_MARGIN_SECONDS = 240  # a round may take its stage table plus this (start, settle, report)
# Checks of a load report that do not make a round invalid for a comparison, only noted:
# a cost; and client-boundness, which qualifies a run's absolute latencies but not the
# paired difference (the same client runs both sides, latency is taken at kernel arrival,
# and the noise it adds is in the measured interval).
NOTED_CHECKS = ("load generator cheaper than the server", "latency is the server's, not the client's")
DELIVERY_CHECK = "every message delivered once, in order"
MACHINE_CHECK = "the machine was not saturated"  # said below with the other processes' share


class Figure:
    """One compared figure, read off a load report's summary.json; higher is worse.
    `resolution(summary)`: how far off one reading can be for want of resolution, as a
    fraction of it (None: negligible)."""

    def __init__(self, key, label, unit, threshold, read, resolution=None):
        self.key, self.label, self.unit, self.threshold, self.read = key, label, unit, threshold, read
        self.resolution = resolution


def _wakeup_ms(summary, key):
    return ms((summary.get("wakeup_latency_s") or {}).get(key))


def _kib_per_poll(summary):
    value = (summary.get("memory") or {}).get("bytes_per_held_poll")
    return None if value is None else value / 1024


def _cpu_resolution(summary):
    """/proc counts CPU in clock ticks (10 ms here): a run's server CPU, the difference of two
    readings, is off by up to one tick; on a short run that is more than any threshold."""
    seconds = (summary.get("cpu") or {}).get("server_cpu_s")
    return None if not seconds else (1.0 / os.sysconf("SC_CLK_TCK")) / seconds


def _memory_resolution(summary):
    """RSS grows by whole pages: memory per held poll, the growth while holding over the
    polls held, is off by up to a page of it. At 100 polls that is about half a percent,
    and the same page counts in every round (a seeded run repeats them) gave an A/A
    comparison an interval of zero width, called better."""
    memory = summary.get("memory") or {}
    idle, holding = memory.get("rss_idle"), memory.get("rss_holding")
    if idle is None or holding is None or holding <= idle:
        return None
    return os.sysconf("SC_PAGE_SIZE") / (holding - idle)


FIGURES = (
    Figure("server_us_per_delivery", "server CPU per delivery", "us", 5.0,
           lambda summary: (summary.get("cpu") or {}).get("server_us_per_delivery"), _cpu_resolution),
    Figure("wakeup_p50_ms", "wake-up latency p50", "ms", 10.0, lambda summary: _wakeup_ms(summary, "p50")),
    Figure("wakeup_p99_ms", "wake-up latency p99", "ms", 10.0, lambda summary: _wakeup_ms(summary, "p99")),
    Figure("kib_per_held_poll", "memory per held poll", "KiB", 5.0, _kib_per_poll, _memory_resolution),
)
WRONG_KINDS = ("lost", "duplicated", "out_of_order")


# -- the statistics (pure: tests feed them synthetic rounds) ----------------------------------

def compare_figure(base, head, threshold, seed=BOOTSTRAP_SEED, confidence=CONFIDENCE, resolution=0.0,
                   resamples=10000):
    """Head against base for one figure, paired by round.

    {ratios, ratio, low, high, noise, detectable, verdict}: ratio is the geometric mean of
    the rounds' head / base, [low, high] its bootstrap interval (widened to Student's t
    interval where that is wider, as it is at few rounds); noise is the interval's
    half-width (log scale, as a fraction), the change this many rounds cannot tell from
    zero; detectable is the smallest slowdown these rounds would call worse (threshold
    plus noise). verdict: "worse" when low > 1 + threshold, "better" when high < 1 -
    threshold, else "unchanged". `resolution`: the most a ratio can be off for want of
    resolution of the readings (a fraction); the interval is widened by it on both sides."""
    if len(base) != len(head):
        raise ValueError("base has %d rounds and head %d: rounds are paired" % (len(base), len(head)))
    if len(base) < 2:
        raise ValueError("an interval needs at least 2 rounds, not %d" % len(base))
    if any(value is None or value <= 0 for value in list(base) + list(head)):
        raise ValueError("every round needs a positive figure (base %s, head %s)" % (base, head))
    ratios = [h / b for b, h in zip(base, head)]
    ratio, low, high = ratio_interval(ratios, confidence=confidence, seed=seed, resamples=resamples)
    low, high = low / (1 + resolution), high * (1 + resolution)
    limit = threshold / 100.0
    noise = math.exp((math.log(high) - math.log(low)) / 2) - 1
    verdict = "worse" if low > 1 + limit else "better" if high < 1 - limit else "unchanged"
    return {"ratios": ratios, "ratio": ratio, "low": low, "high": high, "threshold_percent": threshold,
            "noise": noise, "detectable": (1 + limit) * (1 + noise) - 1, "verdict": verdict, "resolution": resolution,
            "base_median": percentile(sorted(base), 0.5), "head_median": percentile(sorted(head), 0.5)}


def delivery_wrong(summary):
    delivery = summary.get("delivery") or {}
    return {kind: delivery.get(kind) or 0 for kind in WRONG_KINDS}


def round_problems(summary):
    """Why a round's run is not valid for a comparison ([] when it is): a failed check that
    is not a cost or the delivery (judged apart), or a saturated machine."""
    if summary is None:
        return ["it wrote no report"]
    problems = ["%s: %s" % (check["check"], check["detail"]) for check in summary.get("checks") or []
                if not check["passed"] and check["check"] not in NOTED_CHECKS + (DELIVERY_CHECK, MACHINE_CHECK)]
    machine = summary.get("machine_check") or {}
    if machine.get("machine_bound"):
        others = summary.get("other_processes_cpu_mean")
        problems.append("machine-bound: every core busy in %s of %s burst seconds (server, load generator and %s "
                        "together), so latencies include waiting for a core"
                        % (machine.get("burst_seconds_saturated"), machine.get("burst_seconds"),
                           "other processes at %.0f%% of a core on average" % others if others is not None
                           else "other processes"))
    return problems


def judge(rounds, figures=FIGURES, seed=BOOTSTRAP_SEED, confidence=CONFIDENCE, resamples=10000):
    """The comparison of paired rounds [{"base": summary, "head": summary}], as a dict with
    code (UNCHANGED, WORSE, CANNOT_COMPARE), word, reasons and per-figure results.
    `confidence`: of each figure's interval (a look's, loadtests/stopping.py)."""
    result = {"figures": {}, "reasons": [], "invalid_rounds": [], "delivery": [], "confidence": confidence}
    for number, pair in enumerate(rounds, 1):
        for side in ("base", "head"):
            for problem in round_problems(pair.get(side)):
                result["invalid_rounds"].append({"round": number, "side": side, "problem": problem})
        result["delivery"].append({side: delivery_wrong(pair[side]) if pair.get(side) else None
                                   for side in ("base", "head")})
    wrong_in_head = {kind: sum((entry["head"] or {}).get(kind, 0) for entry in result["delivery"])
                     for kind in WRONG_KINDS}
    result["wrong_in_head"] = wrong_in_head
    if any(wrong_in_head.values()):
        result["reasons"].append("head lost %(lost)d, duplicated %(duplicated)d and reordered %(out_of_order)d "
                                 "message(s): a regression whatever the figures" % wrong_in_head)
    for figure in figures:
        base = [figure.read(pair["base"]) if pair.get("base") else None for pair in rounds]
        head = [figure.read(pair["head"]) if pair.get("head") else None for pair in rounds]
        entry = {"label": figure.label, "unit": figure.unit, "base": base, "head": head}
        resolution = 0.0
        if figure.resolution is not None:
            resolution = max([sum(figure.resolution(pair[side]) or 0.0 for side in ("base", "head") if pair.get(side))
                              for pair in rounds] or [0.0])
        try:
            entry.update(compare_figure(base, head, figure.threshold, seed=seed, resolution=resolution,
                                        confidence=confidence, resamples=resamples))
        except ValueError as exc:
            entry.update(verdict="not compared", why=str(exc), threshold_percent=figure.threshold)
        result["figures"][figure.key] = entry
    worse = [entry for entry in result["figures"].values() if entry["verdict"] == "worse"]
    for entry in worse:
        result["reasons"].append("%s %+.1f%% (interval %+.1f%% to %+.1f%%, threshold +%g%%)" % (
            entry["label"], (entry["ratio"] - 1) * 100, (entry["low"] - 1) * 100, (entry["high"] - 1) * 100,
            entry["threshold_percent"]))
    not_compared = [entry for entry in result["figures"].values() if entry["verdict"] == "not compared"]
    if any(wrong_in_head.values()):
        result["code"], result["word"] = WORSE, "WORSE"
    elif result["invalid_rounds"] or not_compared:
        # Figures of invalid runs decide nothing, either way: they are shown, not judged.
        result["code"], result["word"] = CANNOT_COMPARE, "COULD NOT COMPARE"
        result["reasons"] = ["round %(round)d, %(side)s: %(problem)s" % item for item in result["invalid_rounds"]]
        result["reasons"] += ["%s: %s" % (entry["label"], entry["why"]) for entry in not_compared]
    elif worse:
        result["code"], result["word"] = WORSE, "WORSE"
    else:
        better = [entry["label"] for entry in result["figures"].values() if entry["verdict"] == "better"]
        result["code"] = UNCHANGED
        result["word"] = "BETTER" if better else "UNCHANGED"
        if better:
            result["reasons"].append("better: " + ", ".join(better))
    return result


# -- the base ---------------------------------------------------------------------------------------

def dirty_files():
    """Tracked files that differ from HEAD: head would not be the commit the report names."""
    try:
        status = git("status", "--porcelain", "--untracked-files=no")
    except GitFailed as exc:
        raise Unmeasured("this tree is not a git checkout (%s)" % exc)
    # "XY name": the first line's leading blank went with the stripping
    return [line.split(None, 1)[1] for line in status.splitlines() if line.strip()]


def base_protocol_problem(root, python, log_path, protocol_problem):
    """Start the base's chattle.py once and ask it /health and a poll as the protocol says
    (`protocol_problem`, a run's own check): a base that does not speak it cannot be
    compared. None when it does."""
    script = os.path.join(root, "chattle.py")
    if not os.path.exists(script):
        return "the base has no chattle.py"
    port = free_port()
    url = "http://%s:%d" % (LOOPBACK, port)
    server = Process([python, script, "--host", LOOPBACK, "--port", str(port)], cwd=root,
                     env=dict(without_bench_environment(), PYTHONUNBUFFERED="1"), log_path=log_path)
    try:
        def listening():
            import socket
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return True
        wait_until(listening, 30, "the base's chattle.py on %s" % url, server)
        return protocol_problem(url)
    except RuntimeError as exc:
        return str(exc).strip()
    finally:
        server.stop(grace=10)


# -- the rounds ------------------------------------------------------------------------------------

def run_round(side, number, load_argv, rounds_dir, timeout):
    """One complete `make load` of this tree's client against `side`'s server code (a Side of
    harness/sides.py), as a child process of its own (stopped by pid if we are stopped); its
    summary.json, or None."""
    root = os.path.join(rounds_dir, "%s-%s" % (number, side.name))
    os.makedirs(root)
    argv = [sys.executable, "-m", "loadtests.run", *load_argv, "--report-root", root,
            "--server-root", side.root, "--server-python", side.python]
    log = os.path.join(rounds_dir, "%s-%s.log" % (number, side.name))
    child = Process(argv, env=side.env, cwd=ROOT, log_path=log, own_session=True)
    try:
        deadline = time.monotonic() + timeout
        while child.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        if child.alive():
            print("compare: round %s %s still running after %.0f s; stopping it" % (number, side.name, timeout),
                  file=sys.stderr)
    finally:
        child.stop(grace=120)  # SIGTERM: run.py stops its server and Locust and writes its report
    path = os.path.join(root, "latest", "summary.json")
    if not os.path.exists(path):
        print(child.log_tail(15), file=sys.stderr)
        return None, root
    import json
    with open(path) as data:
        summary = json.load(data)
    summary["_report_dir"] = os.path.realpath(os.path.join(root, "latest"))
    summary["_exit_code"] = child.popen.returncode
    return summary, root


def run_pair(sides, label, load_argv, rounds_dir, timeout, order):
    """Both sides once, in `order` (drawn per round: whatever favours the first or the second
    run of a pair falls on either side by chance, not by a pattern a drift could follow),
    the canary read before the first run and after each; the pair, with "_order" and
    "_canary" (the readings) beside the sides' summaries."""
    pair = {"_order": [side.name for side in order], "_canary": [read_canary()]}
    for side in order:
        started = time.monotonic()
        pair[side.name], _root = run_round(side, label, load_argv, rounds_dir, timeout)
        pair["_canary"].append(read_canary())
        print(round_line(label, side.name, pair[side.name]) + " (%.0f s)" % (time.monotonic() - started), flush=True)
    print("compare: round %s %s" % (label, canary_line(pair["_canary"])), flush=True)
    return pair


def round_line(number, side, summary):
    if summary is None:
        return "compare: round %s %-4s  no report (see its log)" % (number, side)
    values = ["%s %s" % (figure.key.split("_")[0] if figure.unit != "ms" else figure.key[7:10],
                         "-" if figure.read(summary) is None else "%.3g%s" % (figure.read(summary), figure.unit))
              for figure in FIGURES]
    wrong = delivery_wrong(summary)
    problems = round_problems(summary)
    return "compare: round %s %-4s  %s; %d lost/dup/reordered%s" % (
        number, side, ", ".join(values), sum(wrong.values()), "; INVALID: " + "; ".join(problems) if problems else "")


# -- the report ------------------------------------------------------------------------------------

def merged_latency(summaries):
    """Every round's wake-up latency histogram of one side, added up (from raw/run.json)."""
    from loadtests.report import load_tally
    total = LatencyHistogram()
    for summary in summaries:
        if summary and summary.get("_report_dir"):
            tally = load_tally(summary["_report_dir"])
            if tally is not None:
                total.add(tally.latency)
    return total


def draw_compare_charts(report_dir, result, rounds, what):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colours = {"base": "#1f5fbf", "head": "#e08a00"}
    charts = []

    def save(fig, name, caption):
        fig.tight_layout()
        fig.savefig(os.path.join(report_dir, name), dpi=100)
        plt.close(fig)
        charts.append((name, caption))

    # the intervals against their thresholds: the verdict at a glance
    fig, axis = plt.subplots(figsize=(9, 0.7 + 0.6 * len(FIGURES)))
    for row, figure in enumerate(FIGURES):
        entry = result["figures"][figure.key]
        axis.axhspan(row - 0.4, row + 0.4, xmin=0, xmax=1, color="#f4f6f9", zorder=0)
        if "ratio" in entry:
            colour = {"worse": "#b3261e", "better": "#1b7f3b"}.get(entry["verdict"], "#39414f")
            axis.plot([(entry["low"] - 1) * 100, (entry["high"] - 1) * 100], [row, row], color=colour, linewidth=4)
            axis.plot((entry["ratio"] - 1) * 100, row, "o", color=colour)
            axis.plot([(ratio - 1) * 100 for ratio in entry["ratios"]], [row] * len(entry["ratios"]), "|",
                      color="#888", markersize=12)
        axis.plot([figure.threshold, figure.threshold], [row - 0.4, row + 0.4], color="#b3261e", linestyle="--")
        axis.plot([-figure.threshold, -figure.threshold], [row - 0.4, row + 0.4], color="#1b7f3b", linestyle="--")
    axis.axvline(0, color="#555", linewidth=0.8)
    axis.set_yticks(range(len(FIGURES)))
    axis.set_yticklabels([figure.label for figure in FIGURES])
    axis.invert_yaxis()
    axis.set_xlabel("head / base - 1, %")
    save(fig, "intervals.png",
         "Head against base, per figure: the dot is the geometric mean of the rounds' head / base ratios, the bar "
         "its %.4g%% bootstrap interval (rounds resampled with replacement, seed %d; widened to Student's t "
         "interval where that is wider, as at few rounds), grey ticks each round's "
         "ratio. Red dashes are the thresholds: a figure is worse only when its whole bar lies right of its red "
         "dash, better when it lies left of the green one. %s."
         % (result.get("confidence", CONFIDENCE) * 100, BOOTSTRAP_SEED, what))

    # per-round points, base against head
    fig, axes = plt.subplots(1, len(FIGURES), figsize=(3.1 * len(FIGURES), 3.2))
    for axis, figure in zip(axes, FIGURES):
        entry = result["figures"][figure.key]
        xs = np.arange(1, len(rounds) + 1)
        for side in ("base", "head"):
            values = [np.nan if value is None else value for value in entry[side]]
            axis.plot(xs + (-0.06 if side == "base" else 0.06), values, "o-", color=colours[side], label=side)
        axis.set_title(figure.label, fontsize=9)
        axis.set_xticks(xs)
        axis.set_xlabel("round")
        axis.set_ylabel(figure.unit)
        highest = [value for value in entry["base"] + entry["head"] if value is not None]
        axis.set_ylim(0, 1.15 * max(highest) if highest else 1)
    axes[0].legend(fontsize=8, loc="lower right")
    save(fig, "rounds.png",
         "Each figure round by round, base (blue) against head (orange); a round is one run of each, each on "
         "a fresh server (in an order drawn at random per round), so the two points of a round are "
         "minutes apart at most. Paired ratios of these points "
         "make the intervals above. %s." % what)

    # the latency histograms, overlaid
    fig, axis = plt.subplots(figsize=(9, 3.6))
    drawn = False
    histograms = {side: merged_latency([pair.get(side) for pair in rounds]) for side in ("base", "head")}
    edges_all = [edge * 1000 for histogram in histograms.values() if histogram.count
                 for edge, _count in histogram.buckets()]
    if edges_all:
        bins = np.logspace(np.log10(max(min(edges_all), 0.001)), np.log10(max(max(edges_all), 0.01)) + 0.01, 60)
        for side, histogram in histograms.items():
            if not histogram.count:
                continue
            buckets = histogram.buckets()
            edges = np.array([edge * 1000 for edge, _count in buckets])
            counts = np.array([count for _edge, count in buckets], dtype=float)
            axis.hist(np.clip(edges, bins[0], bins[-1]), bins=bins, weights=counts, histtype="step", linewidth=1.6,
                      color=colours[side], label="%s (%d deliveries)" % (side, histogram.count))
            for fraction, style in ((0.5, "--"), (0.99, ":")):
                axis.axvline(histogram.percentile(fraction) * 1000, color=colours[side], linestyle=style,
                             label="%s p%d %.1f ms" % (side, round(fraction * 100), histogram.percentile(fraction)
                                                        * 1000))
            drawn = True
        axis.set_xscale("log")
    if drawn:
        axis.legend(fontsize=8)
    axis.set_xlabel("server wake-up latency, ms (log scale)")
    axis.set_ylabel("deliveries")
    save(fig, "latency_overlay.png",
         "Wake-up latency histograms of every round of each side added up (kernel arrival minus the message's "
         "server 'ts', from each run's HdrHistogram), base (blue) and head (orange) overlaid; dashed the p50, "
         "dotted the p99 of all rounds together (the verdict uses each round's own). %s." % what)
    return charts


def fmt(value, unit):
    return "-" if value is None else "%.3g %s" % (value, unit)


def pct(value):
    return "%+.1f%%" % ((value - 1) * 100)


def figure_row(entry):
    if "ratio" not in entry:
        return "not compared: %s" % entry.get("why")
    return ("%s: base %s, head %s, head/base %s, interval %s to %s (threshold +%g%%); noise +-%.1f%%, "
            "detects a slowdown of %.1f%% or more" % (
                entry["verdict"], fmt(entry["base_median"], entry["unit"]), fmt(entry["head_median"], entry["unit"]),
                pct(entry["ratio"]), pct(entry["low"]), pct(entry["high"]), entry["threshold_percent"],
                entry["noise"] * 100, entry["detectable"] * 100))


def side_by_side(result, rounds):
    """Rows of the table with both sides' runs, round by round."""
    header = ["figure"] + ["base %d" % n for n in range(1, len(rounds) + 1)] + \
        ["head %d" % n for n in range(1, len(rounds) + 1)]
    rows = []
    for figure in FIGURES:
        entry = result["figures"][figure.key]
        rows.append([figure.label + ", " + figure.unit] + [fmt(value, "") for value in entry["base"] + entry["head"]])
    for label, read in (("held polls, peak", lambda s: s.get("held_polls_peak")),
                        ("posts / deliveries", lambda s: "%s / %s" % (s.get("posts"), s.get("deliveries"))),
                        ("lost / dup. / reordered", lambda s: "%(lost)d / %(duplicated)d / %(out_of_order)d"
                         % delivery_wrong(s)),
                        ("listeners that gave up", lambda s: (s.get("delivery") or {}).get("gave_up")),
                        ("client lag p99, ms", lambda s: fmt(((s.get("client_lag_s") or {}).get("p99") or 0) * 1000,
                                                            "")),
                        ("load generator / server CPU", lambda s: fmt((s.get("cpu") or {}).get("client_over_server"),
                                                                      "")),
                        ("saturated burst seconds", lambda s: "%s of %s" % (
                            (s.get("machine_check") or {}).get("burst_seconds_saturated"),
                            (s.get("machine_check") or {}).get("burst_seconds"))),
                        ("other processes CPU, % of a core", lambda s: fmt(s.get("other_processes_cpu_mean"), "")),
                        ("valid", lambda s: "yes" if not round_problems(s) else "NO: " + "; ".join(round_problems(s)))):
        rows.append([label] + ["-" if pair.get(side) is None else str(read(pair[side]))
                               for side in ("base", "head") for pair in rounds])
    return header, rows


def write_report(report_dir, result, rounds, context):
    what = ("%s against base %s (%s), %d rounds each, each round's order drawn at random; %s" % (
        "head %s%s" % (context["head_commit"][:12], " with uncommitted changes" if context["head_dirty"] else ""),
        context["base_revision"], context["base_commit"][:12], len(rounds), context["settings_line"]))
    charts = draw_compare_charts(report_dir, result, rounds, what) if rounds else []
    header, rows = side_by_side(result, rounds) if rounds else ([], [])
    headline = [("verdict", result["word"], "fail" if result["code"] == WORSE else
                 "pass" if result["code"] == UNCHANGED else "fail")]
    headline += [("why", reason, "") for reason in result["reasons"]]
    headline += [("stopped", "%s; the sides' order drawn per round from ORDER_SEED=%s" % (
        result.get("stopped_because"), context.get("order_seed")), ""),
                 ("error rates", result.get("calibration") or "", "")]
    headline += [(entry["label"], figure_row(entry), "fail" if entry["verdict"] == "worse" else "")
                 for entry in result["figures"].values()]
    headline += [("messages wrong in head", "%(lost)d lost, %(duplicated)d duplicated, %(out_of_order)d out of "
                  "order" % result["wrong_in_head"], "fail" if any(result["wrong_in_head"].values()) else "")]
    links = []
    for number, pair in enumerate(rounds, 1):
        for side in ("base", "head"):
            if pair.get(side) and pair[side].get("_report_dir"):
                links.append((os.path.relpath(os.path.join(pair[side]["_report_dir"], "report.html"), report_dir),
                              "round %d %s" % (number, side)))
    links.append(("compare.json", "compare.json (for CI)"))
    notes = ["The figures of invalid rounds are shown, not judged."] if result["code"] == CANNOT_COMPARE else []
    if result.get("discarded_pairs"):
        notes.append("%d pair(s) of runs were not valid and were run again; their reports are in rounds/ (a "
                     "round's first attempt is labelled 1, 2, ..., its second 1b, 2b)." % result["discarded_pairs"])
    write_html(os.path.join(report_dir, "report.html"), "Chattle load: head against base: %s" % result["word"],
               "%s. %s" % (what, machine_line()), headline, charts, links=links, notes=notes,
               tables=[("Both runs side by side, round by round", header, rows)] if rows else ())
    summary = dict(context, verdict=result["word"], exit_code=result["code"], reasons=result["reasons"],
                   figures=result["figures"], delivery=result["delivery"], wrong_in_head=result["wrong_in_head"],
                   invalid_rounds=result["invalid_rounds"], rounds=len(rounds), charts=[name for name, _c in charts],
                   discarded_pairs=result.get("discarded_pairs", 0), calibration=result.get("calibration"),
                   stopped_because=result.get("stopped_because"),
                   orders=[pair.get("_order") for pair in rounds], canary=[pair.get("_canary") for pair in rounds],
                   canary_flagged=[bool(pair.get("_canary_flagged")) for pair in rounds],
                   round_reports=[{side: pair[side]["_report_dir"] if pair.get(side) else None
                                   for side in ("base", "head")} for pair in rounds])
    write_json(os.path.join(report_dir, "compare.json"), summary)
    return summary


def print_verdict(result, context, rounds, report_dir):
    print("=" * 78)
    print("compare: %s: head %s%s against base %s (%s), %d round(s) each" % (
        result["word"], context["head_commit"][:12], " (uncommitted changes)" if context["head_dirty"] else "",
        context["base_revision"], context["base_commit"][:12], len(rounds)))
    for reason in result["reasons"]:
        print("  - " + reason)
    print("  %-24s %10s %10s %9s  %-19s %6s %8s  %s" % ("figure", "base", "head", "head/base",
                                                     "%.4g%% interval" % (result.get("confidence", CONFIDENCE) * 100),
                                                     "thresh", "detects", "verdict"))
    for entry in result["figures"].values():
        if "ratio" not in entry:
            print("  %-24s not compared: %s" % (entry["label"], entry["why"]))
            continue
        print("  %-24s %10s %10s %9s  %8s to %-8s %5s%% %7s%%  %s" % (
            entry["label"], fmt(entry["base_median"], entry["unit"]), fmt(entry["head_median"], entry["unit"]),
            pct(entry["ratio"]), pct(entry["low"]), pct(entry["high"]), "+%g" % entry["threshold_percent"],
            "+%.1f" % (entry["detectable"] * 100), entry["verdict"]))
    print("  messages wrong in head  %(lost)d lost, %(duplicated)d duplicated, %(out_of_order)d out of order"
          % result["wrong_in_head"])
    print("  (base, head: medians of the rounds; detects: the smallest slowdown %d rounds call worse, the threshold "
          "plus the noise of this comparison)" % len(rounds))
    if result["code"] == CANNOT_COMPARE:
        print("  (the figures of invalid rounds are shown, not judged)")
    if result.get("stopped_because"):
        print("  stopped: %s (order seed %s)" % (result["stopped_because"], context.get("order_seed")))
    print("  error rates %s" % result.get("calibration"))
    print("  report   %s" % os.path.join(report_dir, "report.html"))
    print("=" * 78)


# -- main ---------------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="make load BASE=<rev>", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    add_to_parser(parser, COMPARE)
    parser.add_argument("--report-root", default=REPORTS_ROOT, help="directory that receives <timestamp>-compare/")
    args, load_argv = parser.parse_known_args(argv)
    if args.base is None:
        parser.error("the following arguments are required: --base")
    return args, load_argv


def main(argv, run):
    """`python -m loadtests.run --base REV [--rounds N] [make load's own flags]`. `run` is
    loadtests/run.py, which hands itself over: it imports this module, so this one cannot
    import it (its flags and preflight judge each round's run here)."""
    args, load_argv = parse_args(list(argv))
    load_args = run.parse_args(load_argv)
    started, problem = time.time(), None
    try:
        with scratch_directory("chattle-compare-") as scratch:
            code = _compare(args, load_argv, load_args, scratch, run)
    except (Unmeasured, RuntimeError, ValueError) as exc:
        print("compare: could not compare: %s" % exc, file=sys.stderr)
        code, problem = CANNOT_COMPARE, str(exc)
    except KeyboardInterrupt:
        print("compare: interrupted; the base's worktree is removed", file=sys.stderr)
        code, problem = 130, "interrupted"
    if args.summary:
        compare_summary.append(args.summary, compare_summary.report_since(args.report_root, started), code, problem)
    return code


def refusals(args, load_args):
    problems = []
    if args.rounds < 2:
        problems.append("ROUNDS=%d: an interval needs at least 2 rounds of each side" % args.rounds)
    if load_args.host:
        problems.append("HOST=%s: a comparison starts the servers of both sides itself; drop HOST" % load_args.host)
    if load_args.remote_workers:
        problems.append("REMOTE_WORKERS: a comparison runs its load here")
    if not load_args.seed:
        problems.append("SEED=0 draws a new schedule each run: base and head need the same one (any other seed)")
    return problems


def _compare(args, load_argv, load_args, scratch, run):
    head_env = parse_head_env(args.head_env)
    problems = refusals(args, load_args)
    _stages, preflight_problems, _notes = run.preflight(load_args)
    problems += preflight_problems
    dirty = dirty_files()
    if dirty and not args.allow_dirty:
        problems.append("this tree has uncommitted changes (%s%s): head would not be the commit the report names. "
                        "Commit or stash them, or give ALLOW_DIRTY=1 (--allow-dirty) to compare them as they are"
                        % (", ".join(dirty[:5]), ", ..." if len(dirty) > 5 else ""))
    if problems:
        print("compare: could not compare:", file=sys.stderr)
        for problem in problems:
            print("  - " + problem, file=sys.stderr)
        return CANNOT_COMPARE

    checkout = BaseCheckout(args.base, scratch)  # a revision that does not exist stops here
    head_commit = git("rev-parse", "HEAD")
    head_state = history.git_state()  # what the history line names, whatever happens meanwhile
    run_provenance = provenance()
    with checkout:
        checkout.check_out()
        problem = base_protocol_problem(checkout.root, checkout.python, os.path.join(scratch, "base-protocol.log"),
                                        run.protocol_problem)
        if problem:
            print("compare: could not compare: base %s (%s) does not serve the Chattle protocol: %s"
                  % (args.base, checkout.commit[:12], problem), file=sys.stderr)
            return CANNOT_COMPARE
        head_root = copy_of_this_tree(os.path.join(scratch, "head"))  # beside the base's: the same path length
        sides = base_and_head(checkout, head_root, head_env)
        bench_env = sides[1].bench_env
        os.makedirs(args.report_root, exist_ok=True)
        report_dir = new_report_dir("compare", root=args.report_root)
        rounds_dir = os.path.join(report_dir, "rounds")
        os.makedirs(rounds_dir)
        settings = history.load_settings(vars(load_args), environ={})
        settings_line = ", ".join("%s=%s" % item for item in sorted(settings.items())
                                  if item[1] not in (None, {}, ""))
        print("compare: base %s (%s) in %s, on %s; head %s is this tree%s, its servers run from a copy in %s; "
              "report in %s" % (args.base, checkout.commit[:12], checkout.root, checkout.venv_note, head_commit[:12],
                                " (uncommitted changes)" if dirty else "", head_root, report_dir), flush=True)
        if bench_env:
            print("compare: head's servers get %s" % assignments(bench_env))
        timeout = load_args.duration + ROUND_MARGIN_SECONDS
        rounds, discarded = run_rounds(args, sides, load_argv, rounds_dir, timeout)
        result = judge(rounds, confidence=look_confidence(args.rounds, max_rounds(args), len(rounds)))
        result["discarded_pairs"] = len(discarded)
        result["stopped_because"] = rounds.stopped_because
        result["calibration"] = calibration.quote_for(history.machine_fingerprint(), settings)
        context = {"base_revision": args.base, "base_commit": checkout.commit, "head_commit": head_commit,
                   "head_dirty": bool(dirty), "head_env": bench_env, "settings": settings,
                   "settings_line": settings_line, "load_argv": load_argv, "machine": history.machine_fingerprint(),
                   "order_seed": rounds.order_seed, "looks": looks(args.rounds, max_rounds(args)),
                   "look_confidence": look_confidence(args.rounds, max_rounds(args), len(rounds)),
                   "provenance": run_provenance}
        write_report(report_dir, result, rounds, context)
        print_verdict(result, context, rounds, report_dir)
        record_history(result, settings, bench_env, checkout.commit, report_dir, args.report_root, head_state)
        return result["code"]


class Rounds(list):
    """The rounds a comparison ran, with the seed of their order and why it stopped."""
    order_seed = None
    stopped_because = None


def max_rounds(args):
    return max(args.rounds, args.max_rounds)


def run_rounds(args, sides, load_argv, rounds_dir, timeout):
    """At least ROUNDS rounds, then one more at a time until the stopping rule
    (loadtests/stopping.py) says enough; each round's order drawn from ORDER_SEED (printed:
    ORDER_SEED=<it> repeats the orders). A pair that is not valid or whose canary moved by
    more than CANARY_THRESHOLD percent is run again once (RETRIES); (rounds, discarded)."""
    rounds, discarded, retries = Rounds(), [], args.retries
    rounds.order_seed = args.order_seed or random.SystemRandom().randrange(1, 2 ** 31)
    draw = random.Random(rounds.order_seed)
    print("compare: at least %d and at most %d rounds%s, each in a random order (ORDER_SEED=%d); %d look(s), the "
          "first judging %.2f%% intervals, the last %.2f%%" % (
              args.rounds, max_rounds(args), ", %g s at most" % args.time_limit if args.time_limit else "",
              rounds.order_seed, looks(args.rounds, max_rounds(args)),
              look_confidence(args.rounds, max_rounds(args), args.rounds) * 100,
              look_confidence(args.rounds, max_rounds(args), max_rounds(args)) * 100), flush=True)
    started, longest = time.monotonic(), 0.0
    for number in range(1, max_rounds(args) + 1):
        order = in_random_order(sides, draw)
        for attempt in range(retries + 1):
            round_started = time.monotonic()
            pair = run_pair(sides, "%d%s" % (number, "abcdefgh"[attempt] if attempt else ""), load_argv,
                            rounds_dir, timeout, order)
            longest = max(longest, time.monotonic() - round_started)
            problems = round_problems(pair["base"]) + round_problems(pair["head"])
            moved = canary_moved(pair["_canary"])
            pair["_canary_flagged"] = moved * 100 > args.canary_threshold
            if pair["_canary_flagged"]:
                problems.append("the canary moved %.0f%% (over CANARY_THRESHOLD=%g%%)" % (moved * 100,
                                                                                      args.canary_threshold))
            if not problems or attempt == retries:
                break
            # A busy spell of the machine is not the code's doing: the pair, both sides, again.
            print("compare: round %d is not valid or was disturbed (%s); running its pair again"
                  % (number, problems[0]), flush=True)
            discarded.append(pair)
        rounds.append(pair)
        confidence = look_confidence(args.rounds, max_rounds(args), len(rounds))
        rounds.stopped_because = why_stop(judge(rounds, confidence=confidence), len(rounds), args.rounds,
                                          max_rounds(args), time.monotonic() - started, longest, args.time_limit)
        if rounds.stopped_because:
            print("compare: stopping: %s" % rounds.stopped_because, flush=True)
            return rounds, discarded
    return rounds, discarded


def record_history(result, settings, bench_env, base_commit, report_dir, report_root, head_state=None):
    """One line for the whole comparison: head's figures (the rounds' medians)."""
    figures = {key: entry.get("head_median") for key, entry in result["figures"].items()}
    figures["messages_wrong"] = sum(result["wrong_in_head"].values())
    history.append("load", dict(settings, bench_environment=bench_env), figures, report_dir=report_dir,
                   path=history.history_path(report_root),
                   extra={"compare": {"base_commit": base_commit, "verdict": result["word"],
                                      "rounds": len(result["delivery"])},
                          "passed": result["code"] != CANNOT_COMPARE}, state=head_state)
