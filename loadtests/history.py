"""`make history` (python -m loadtests.history): reads reports/history.jsonl, the line
instruments/history.py appends for every `make load` and `make capacity` run, and, for
this machine, draws one chart per figure and per group of identical settings, commit by
commit (in commit order), and marks its steps as asv does: a level that changed and
stayed changed over the following commits, found by a penalised piecewise-constant fit.
"""

import argparse
import json
import math
import os
import sys

from instruments.history import LOAD_FIGURES, history_path, machine_fingerprint
from instruments.page import REPORTS_ROOT, write_html

CHARTS_DIR = "history"
STEP_MIN_RUN = 2          # commits a new level must hold for to count as a step
STEP_MIN_CHANGE = 0.05    # a step smaller than this relative change is not marked


# -- reading it back --------------------------------------------------------------------------------

def read(path):
    """(entries, lines that were not a JSON object)."""
    entries, bad = [], 0
    if not os.path.exists(path):
        return entries, bad
    with open(path) as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(entry, dict) and isinstance(entry.get("figures"), dict):
                entries.append(entry)
            else:
                bad += 1
    return entries, bad


# -- steps ------------------------------------------------------------------------------------------

def _median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def noise_scale(logs):
    """Robust noise of a series (in log units) from its successive differences: a step
    moves one difference, noise moves them all."""
    diffs = [abs(b - a) for a, b in zip(logs, logs[1:])]
    return 1.4826 * _median(diffs) / math.sqrt(2) if diffs else 0.0


def steps(values, min_run=STEP_MIN_RUN, min_change=STEP_MIN_CHANGE, penalty=None):
    """[(index, level before, level after)]: where a new level begins in `values` (positive
    figures in commit order) and holds for at least `min_run` values.

    A piecewise-constant fit of log(values), each segment at its median, minimising the
    sum of absolute deviations plus `penalty` per segment (asv's approach: L1, so a stray
    value moves no level), with every segment at least `min_run` long: a change seen only
    at the last commit, or a one-commit blip, is not a step. Adjacent levels closer than
    `min_change`, or than twice the series' noise, are merged. Deterministic: no randomness, exact dynamic programme."""
    if any(value is None or value <= 0 for value in values):
        return []
    logs = [math.log(value) for value in values]
    count = len(logs)
    if count < 2 * min_run:
        return []
    noise = noise_scale(logs)
    if penalty is None:
        # A split must pay for itself beyond noise and beyond the smallest step marked.
        penalty = max(8 * noise, 2 * math.log1p(min_change))
    smallest = max(math.log1p(min_change), 2 * noise)  # a step stands out of the noise

    def cost(start, end):
        level = _median(logs[start:end])
        return sum(abs(value - level) for value in logs[start:end])

    best = [math.inf] * (count + 1)
    previous = [0] * (count + 1)
    best[0] = 0.0
    for end in range(min_run, count + 1):
        for start in range(0, end - min_run + 1):
            if best[start] == math.inf or (start and start < min_run):
                continue
            total = best[start] + cost(start, end) + penalty
            if total < best[end]:
                best[end], previous[end] = total, start
    bounds, end = [], count
    while end > 0:
        bounds.append(previous[end])
        end = previous[end]
    starts = sorted(bounds)
    segments = [(start, end) for start, end in zip(starts, starts[1:] + [count])]
    merged = [segments[0]]
    for start, end in segments[1:]:
        last = merged[-1]
        before, after = _median(logs[last[0]:last[1]]), _median(logs[start:end])
        if abs(after - before) < smallest:
            merged[-1] = (last[0], end)
        else:
            merged.append((start, end))
    return [(start, math.exp(_median(logs[before_start:before_end])), math.exp(_median(logs[start:end])))
            for (before_start, before_end), (start, end) in zip(merged, merged[1:])]


# -- make history --------------------------------------------------------------------------------------

def valid(entry):
    """False for a run its own checks failed, or that was machine-bound (or a comparison
    that could not be judged); such runs are drawn apart."""
    return entry.get("passed") is not False and not entry.get("machine_bound")


def by_commit(entries, figure):
    """[(commit, [values of clean runs], [values of dirty runs], [values of clean runs that
    were not valid])] in commit order; the first list includes the third."""
    commits = {}
    for entry in entries:
        value = entry["figures"].get(figure)
        if value is None or entry.get("commit") is None:
            continue
        slot = commits.setdefault(entry["commit"], {"clean": [], "dirty": [], "invalid": [],
                                                    "order": (entry.get("commit_time") or 0, entry["time"])})
        slot["dirty" if entry.get("dirty") else "clean"].append(value)
        if not entry.get("dirty") and not valid(entry):
            slot["invalid"].append(value)
    ordered = sorted(commits.items(), key=lambda item: item[1]["order"])
    return [(commit, slot["clean"], slot["dirty"], slot["invalid"]) for commit, slot in ordered]


def figure_labels(entries):
    labels = {key: (label, unit) for key, label, unit in LOAD_FIGURES}
    for entry in entries:
        for key in entry["figures"]:
            labels.setdefault(key, (key.replace("_", " "), ""))
    return labels


def draw(entries, out_dir, title_note=""):
    """One chart per figure of `entries` (one machine, one settings group); [(png, caption)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    charts = []
    labels = figure_labels(entries)
    for figure, (label, unit) in labels.items():
        series = by_commit(entries, figure)
        if not series or not all(isinstance(value, (int, float)) for _c, clean, dirty, _o in series
                                 for value in clean + dirty):
            continue
        fig, axis = plt.subplots(figsize=(9, 3.4))
        xs_clean = [(index, value) for index, (_c, clean, _d, _o) in enumerate(series) for value in clean]
        xs_dirty = [(index, value) for index, (_c, _clean, dirty, _o) in enumerate(series) for value in dirty]
        if xs_clean:
            axis.plot(*zip(*xs_clean), "o", color="#1f5fbf", alpha=0.6, label="run (committed tree)")
        if xs_dirty:
            axis.plot(*zip(*xs_dirty), "o", mfc="none", color="#888", label="run (uncommitted changes)")
        xs_invalid = [(index, value) for index, (_c, _cl, _d, invalid) in enumerate(series) for value in invalid]
        if xs_invalid:
            axis.plot(*zip(*xs_invalid), "x", color="#b3261e", label="run not valid (machine-bound, failed check)")
        medians = [(index, _median(clean)) for index, (_c, clean, _d, _o) in enumerate(series) if clean]
        if medians:
            axis.plot(*zip(*medians), "-", color="#1f5fbf", linewidth=1, label="median per commit")
        found = steps([value for _index, value in medians]) if len(medians) >= 2 * STEP_MIN_RUN else []
        notes = []
        for position, before, after in found:
            x = medians[position][0] - 0.5
            axis.axvline(x, color="#b3261e", linestyle="--")
            change = after / before - 1
            axis.annotate("%+.0f%%" % (change * 100), (x, after), color="#b3261e", fontsize=9,
                          xytext=(4, 4), textcoords="offset points")
            notes.append("%s: %+.1f%% (%.3g to %.3g %s)" % (series[medians[position][0]][0][:10], change * 100,
                                                             before, after, unit))
        axis.set_xticks(range(len(series)))
        axis.set_xticklabels([commit[:7] for commit, _cl, _d, _o in series], rotation=45, ha="right", fontsize=7)
        axis.set_ylabel("%s, %s" % (label, unit) if unit else label)
        axis.set_xlabel("commit (in commit order)")
        axis.set_ylim(bottom=0)
        axis.legend(fontsize=8)
        fig.tight_layout()
        name = "%s.png" % figure
        fig.savefig(os.path.join(out_dir, name), dpi=100)
        plt.close(fig)
        runs = len(xs_clean) + len(xs_dirty)
        charts.append((name, "%s by commit: %d run(s) over %d commit(s); hollow points had uncommitted changes and "
                             "stay out of the median and the steps; red crosses mark runs that were not valid "
                             "(machine-bound, or a failed check), kept in the median. Steps (red, dashed) are "
                             "levels that changed by at least %.0f%% and held for %d or more commits: %s. %s"
                       % (label, runs, len(series), STEP_MIN_CHANGE * 100, STEP_MIN_RUN,
                          "; ".join(notes) or "none", title_note)))
    return charts


def settings_line(entry):
    settings = entry.get("settings") or {}
    return "%s: %s" % (entry.get("kind"), ", ".join("%s=%s" % item for item in sorted(settings.items())
                                                     if item[1] not in (None, {}, "")))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Draw the history of make load / make capacity: a trend chart per "
                                                 "headline figure, commit by commit, steps marked")
    parser.add_argument("--history", default=history_path(), help="the history file (default %(default)s)")
    parser.add_argument("--out", default=os.path.join(REPORTS_ROOT, CHARTS_DIR),
                        help="where the charts and index.html go (default %(default)s)")
    parser.add_argument("--all-machines", action="store_true", help="also runs of other machines (each apart)")
    args = parser.parse_args(argv)
    entries, bad = read(args.history)
    if bad:
        print("history: %d line(s) of %s are not a run's record; skipped" % (bad, args.history))
    here = machine_fingerprint()["id"]
    if not args.all_machines:
        entries = [entry for entry in entries if entry.get("machine_id") == here]
    if not entries:
        print("history: no runs of this machine in %s yet: `make load` (or `make capacity`) adds one per run"
              % args.history, file=sys.stderr)
        return 2
    groups = {}
    for entry in entries:
        groups.setdefault((entry.get("machine_id"), entry.get("settings_id")), []).append(entry)
    ordered = sorted(groups.values(), key=lambda group: max(entry["time"] for entry in group), reverse=True)
    charts = []
    for number, group in enumerate(ordered, 1):
        sub = "group-%d" % number
        note = "Settings: %s. Machine %s (%s, %s cores, kernel %s)." % (
            settings_line(group[-1]), group[-1].get("machine_id"), group[-1]["machine"].get("cpu_model"),
            group[-1]["machine"].get("cores"), group[-1]["machine"].get("kernel"))
        drawn = draw(group, os.path.join(args.out, sub), note)
        charts += [(os.path.join(sub, name), caption) for name, caption in drawn]
        print("history: %d run(s), %s -> %s/" % (len(group), settings_line(group[-1])[:110], os.path.join(args.out,
                                                                                                         sub)))
    write_html(os.path.join(args.out, "index.html"), "Chattle history",
               "%d run(s) from %s, newest settings first" % (len(entries), args.history),
               [("settings groups", len(ordered), ""), ("this machine", here, "")], charts)
    print("history: %s" % os.path.join(args.out, "index.html"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
