"""`make history` (python -m loadtests.history): reads reports/history.jsonl, the line
instruments/history.py appends for every `make load` and `make capacity` run, and, for
this machine, draws one chart per figure and per group of identical settings, commit by
commit (in commit order), and marks the commits where a figure's level shifted (change
points, found by Apache Otava), on the charts and in a table.
"""

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass

from otava.analysis import compute_change_points

from instruments.history import LOAD_FIGURES, history_path, machine_fingerprint
from instruments.page import REPORTS_ROOT, write_html

CHARTS_DIR = "history"


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


# -- change points ---------------------------------------------------------------------------------

MIN_COMMITS = 4         # fewer commits than this: no change point is looked for, and the table says so
MAX_PVALUE = 0.001      # a change point's two sides differ at this significance (Student's t, two-sided)
MIN_CHANGE = 0.05       # and by at least this relative change of their means
WINDOW = 30             # commits per window of Otava's split step


@dataclass(frozen=True)
class Shift:
    """Where a figure's level changed: `index` is the first commit at the new level."""
    index: int
    before: float
    after: float
    pvalue: float

    @property
    def change(self):
        return self.after / self.before - 1 if self.before else math.inf


def shifts(values, max_pvalue=MAX_PVALUE, min_change=MIN_CHANGE):
    """[Shift] in `values` (one figure per commit, in commit order), or None when there are
    fewer than MIN_COMMITS values to judge.

    Apache Otava's change-point detection (Hunter: E-divisive split over sliding windows,
    then a merge that keeps only points whose two sides differ by Student's t at `max_pvalue`
    and by `min_change`). No randomness: the same values always give the same points."""
    if len(values) < MIN_COMMITS:
        return None
    found, _weak = compute_change_points([float(value) for value in values], window_len=WINDOW,
                                         max_pvalue=max_pvalue, min_magnitude=min_change)
    return [Shift(int(point.index), float(point.stats.mean_1), float(point.stats.mean_2), float(point.stats.pvalue))
            for point in found]


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


def figure_shifts(series):
    """(per-commit medians [(commit position, median)], [Shift] or None when too short) of one
    figure's series from by_commit: runs with uncommitted changes stay out."""
    medians = [(index, statistics.median(clean)) for index, (_c, clean, _d, _o) in enumerate(series) if clean]
    return medians, shifts([value for _index, value in medians])


def shift_rows(label, unit, series, medians, found):
    """The table's rows for one figure: one per change point, or one saying why there is none."""
    if found is None:
        return [(label, "too short: %d commit(s) with committed runs, change points need %d or more"
                 % (len(medians), MIN_COMMITS), "", "", "", "")]
    if not found:
        return [(label, "no change point over %d commit(s)" % len(medians), "", "", "", "")]
    return [(label, series[medians[shift.index][0]][0][:10], "%.4g %s" % (shift.before, unit),
             "%.4g %s" % (shift.after, unit), "%+.1f%%" % (shift.change * 100), "%.2g" % shift.pvalue)
            for shift in found]


SHIFT_HEADER = ("figure", "commit (first at the new level)", "before (mean)", "after (mean)", "change", "p")


def text_table(header, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  " + "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in [header] + list(rows))


def draw(entries, out_dir, title_note=""):
    """One chart per figure of `entries` (one machine, one settings group), each change point a
    dashed line at its commit: ([(png, caption)], table rows)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    charts, rows = [], []
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
        medians, found = figure_shifts(series)
        if medians:
            axis.plot(*zip(*medians), "-", color="#1f5fbf", linewidth=1, label="median per commit")
        notes = []
        for shift in found or []:
            position = medians[shift.index][0]
            commit = series[position][0]
            x = position - 0.5
            axis.axvline(x, color="#b3261e", linestyle="--")
            axis.annotate("%s %+.0f%%" % (commit[:7], shift.change * 100), (x, shift.after), color="#b3261e",
                          fontsize=9, xytext=(4, 4), textcoords="offset points")
            notes.append("%s: %+.1f%% (%.3g to %.3g %s, p=%.2g)" % (commit[:10], shift.change * 100, shift.before,
                                                                   shift.after, unit, shift.pvalue))
        rows += shift_rows(label, unit, series, medians, found)
        axis.set_xticks(range(len(series)))
        axis.set_xticklabels([commit[:7] for commit, _cl, _d, _o in series], rotation=45, ha="right", fontsize=7)
        axis.set_ylabel("%s, %s" % (label, unit) if unit else label)
        axis.set_xlabel("commit (in commit order)")
        axis.set_ylim(0, axis.get_ylim()[1] * 1.12)   # room above for the change points' labels
        axis.legend(fontsize=8)
        fig.tight_layout()
        name = "%s.png" % figure
        fig.savefig(os.path.join(out_dir, name), dpi=100)
        plt.close(fig)
        runs = len(xs_clean) + len(xs_dirty)
        marked = ("too short to look for change points (fewer than %d commits)" % MIN_COMMITS if found is None
                  else "; ".join(notes) or "none")
        charts.append((name, "%s by commit: %d run(s) over %d commit(s); hollow points had uncommitted changes and "
                             "stay out of the median and the change points; red crosses mark runs that were not "
                             "valid (machine-bound, or a failed check), kept in the median. Change points (red, "
                             "dashed, at the first commit of the new level; Apache Otava, p < %g and at least "
                             "%.0f%%): %s. %s"
                       % (label, runs, len(series), MAX_PVALUE, MIN_CHANGE * 100, marked, title_note)))
    return charts, rows


def settings_line(entry):
    settings = entry.get("settings") or {}
    return "%s: %s" % (entry.get("kind"), ", ".join("%s=%s" % item for item in sorted(settings.items())
                                                     if item[1] not in (None, {}, "")))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Draw the history of make load / make capacity: a trend chart per "
                                                 "headline figure, commit by commit, the shifts marked at their commit")
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
    charts, tables = [], []
    for number, group in enumerate(ordered, 1):
        sub = "group-%d" % number
        note = "Settings: %s. Machine %s (%s, %s cores, kernel %s)." % (
            settings_line(group[-1]), group[-1].get("machine_id"), group[-1]["machine"].get("cpu_model"),
            group[-1]["machine"].get("cores"), group[-1]["machine"].get("kernel"))
        drawn, rows = draw(group, os.path.join(args.out, sub), note)
        charts += [(os.path.join(sub, name), caption) for name, caption in drawn]
        tables.append(("change points, %s: %s" % (sub, settings_line(group[-1])), SHIFT_HEADER, rows))
        print("history: %d run(s), %s -> %s/" % (len(group), settings_line(group[-1])[:110], os.path.join(args.out,
                                                                                                         sub)))
        print(text_table(SHIFT_HEADER, rows))
    write_html(os.path.join(args.out, "index.html"), "Chattle history",
               "%d run(s) from %s, newest settings first" % (len(entries), args.history),
               [("settings groups", len(ordered), ""), ("this machine", here, "")], charts, tables=tables)
    print("history: %s" % os.path.join(args.out, "index.html"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
