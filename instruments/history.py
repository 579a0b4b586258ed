"""The runs' history: one line per `make load` and `make capacity` run in
reports/history.jsonl (`make history`, loadtests/history.py, draws it).

Each line names what was measured (commit, whether the tree had uncommitted changes),
where (a machine fingerprint: CPU model, cores, memory, kernel, Python and the library
versions), how (the run's settings) and what came out (its headline figures). Another
tool records a run with one call:

    from instruments import history
    history.append("capacity", settings={...}, figures={"capacity_polls": 15000, ...},
                   report_dir=report_dir)
"""

import datetime
import hashlib
import json
import os
import platform
import sys

from instruments.measures import ms
from instruments.page import REPORTS_ROOT, machine_description
from instruments.provenance import bench_environment, cpu_model, git

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HISTORY_NAME = "history.jsonl"
LIBRARIES = ("gevent", "greenlet", "bottle", "gunicorn", "locust", "redis", "hdrhistogram", "psutil")
# What makes two runs' figures comparable as "this machine": not library versions, whose
# change is exactly what a trend may show.
MACHINE_KEYS = ("cpu_model", "cores", "memory_gib", "kernel", "python")


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
