"""The runs' history: one line per `make load` and `make capacity` run in
reports/history.jsonl, and `make history`, a trend chart per headline figure.

Each line names what was measured (commit, whether the tree had uncommitted changes),
where (a machine fingerprint: CPU model, cores, memory, kernel, Python and the library
versions), how (the run's settings) and what came out (its headline figures). Another
tool records a run with one call:

    from instruments import history
    history.append("capacity", settings={...}, figures={"capacity_polls": 15000, ...},
                   report_dir=report_dir)

`make history` (python -m instruments.history) reads the file and, for this machine, draws one
chart per figure and per group of identical settings, commit by commit (in commit
order), and marks its steps as asv does: a level that changed and stayed changed over
the following commits, found by a penalised piecewise-constant fit.
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import sys

from instruments.measures import ms
from instruments.page import REPORTS_ROOT, machine_description, write_html
from instruments.provenance import bench_environment, git

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HISTORY_NAME = "history.jsonl"
CHARTS_DIR = "history"
LIBRARIES = ("gevent", "greenlet", "bottle", "gunicorn", "locust", "redis", "hdrhistogram", "psutil")
# What makes two runs' figures comparable as "this machine": not library versions, whose
# change is exactly what a trend may show.
MACHINE_KEYS = ("cpu_model", "cores", "memory_gib", "kernel", "python")
STEP_MIN_RUN = 2          # commits a new level must hold for to count as a step
STEP_MIN_CHANGE = 0.05    # a step smaller than this relative change is not marked


def history_path(report_root=REPORTS_ROOT):
    return os.path.join(report_root, HISTORY_NAME)


# -- what a line records ----------------------------------------------------------------------

def git_state(root=ROOT):
    """{commit, dirty, commit_time, subject}: dirty when tracked files differ from the commit
    (untracked files, reports among them, do not count). Nones outside a git checkout."""
    commit = git("rev-parse", "HEAD", cwd=root, check=False)
    if commit is None:
        return {"commit": None, "dirty": None, "commit_time": None, "subject": None}
    dirty = git("status", "--porcelain", "--untracked-files=no", cwd=root, check=False)
    shown = (git("show", "-s", "--format=%ct %s", commit, cwd=root, check=False) or "0 ").split(" ", 1)
    return {"commit": commit, "dirty": bool(dirty), "commit_time": int(shown[0]), "subject": shown[1][:100]}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions():
    from importlib import metadata
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def machine_fingerprint():
    described = machine_description()
    fingerprint = {"cpu_model": cpu_model(), "cores": os.cpu_count(), "memory_gib": described.get("memory_gib"),
                   "kernel": platform.release(), "machine": platform.machine(), "python": platform.python_version(),
                   "libraries": library_versions()}
    fingerprint["id"] = digest({key: fingerprint[key] for key in MACHINE_KEYS})
    return fingerprint


def digest(value):
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def append(kind, settings, figures, report_dir=None, path=None, root=ROOT, extra=None, state=None):
    """Append one run's line to the history (reports/history.jsonl unless `path`); the line.
    `state`: git_state() as it was when the run began (else read now). Never fails the run
    that calls it: a history that cannot be written is said, not raised."""
    state = state or git_state(root)
    machine = machine_fingerprint()
    entry = {"kind": kind, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "commit": state["commit"], "dirty": state["dirty"], "commit_time": state["commit_time"],
             "subject": state["subject"], "machine": machine, "machine_id": machine["id"],
             "settings": settings, "settings_id": digest([kind, settings]), "figures": figures,
             "report": report_dir}
    entry.update(extra or {})
    path = path or history_path()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as out:
            out.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
    except OSError as exc:
        print("history: could not append to %s: %s" % (path, exc), file=sys.stderr)
    return entry


# -- a load run's line ---------------------------------------------------------------------------

LOAD_SETTINGS = ("users", "posters", "rooms", "duration", "burst_size", "burst_gap", "schedule_seed", "poll_timeout",
                 "spawn_rate", "stop_rate", "workers")
# (key, label, unit): the headline figures of a load run, every one lower-is-better
LOAD_FIGURES = (
    ("server_us_per_delivery", "server CPU per delivery", "us"),
    ("wakeup_p50_ms", "wake-up latency p50", "ms"),
    ("wakeup_p99_ms", "wake-up latency p99", "ms"),
    ("kib_per_held_poll", "memory per held poll", "KiB"),
    ("messages_wrong", "messages lost, duplicated or out of order", "messages"),
)


def load_settings(run_info, environ=None):
    settings = {key: run_info.get(key) for key in LOAD_SETTINGS}
    settings["host"] = run_info.get("host") or None  # None: the run started its own server
    settings["bench_environment"] = bench_environment(environ)
    return settings


def load_figures(summary):
    """The headline figures of one load report's summary (None where it has none)."""
    latency, memory, delivery = summary.get("wakeup_latency_s") or {}, summary.get("memory") or {}, \
        summary.get("delivery") or {}
    return {"server_us_per_delivery": (summary.get("cpu") or {}).get("server_us_per_delivery"),
            "wakeup_p50_ms": ms(latency.get("p50")), "wakeup_p99_ms": ms(latency.get("p99")),
            "kib_per_held_poll": None if memory.get("bytes_per_held_poll") is None
            else memory["bytes_per_held_poll"] / 1024,
            "messages_wrong": sum(delivery.get(key) or 0 for key in ("lost", "duplicated", "out_of_order")),
            "held_polls_peak": summary.get("held_polls_peak"), "deliveries": summary.get("deliveries")}


def record_load(summary, report_root, report_dir=None):
    """`make load`'s line, next to its reports (<report root>/history.jsonl)."""
    machine_check = summary.get("machine_check") or {}
    return append("load", load_settings(summary.get("run") or {}), load_figures(summary), report_dir=report_dir,
                  path=history_path(report_root),
                  extra={"passed": summary.get("passed"), "machine_bound": machine_check.get("machine_bound"),
                         "contended": summary.get("machine_contended")})


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
