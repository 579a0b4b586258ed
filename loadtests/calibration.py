"""What `make load BASE=` gets wrong on this machine, as `make load-calibrate` measured it:
reports/calibration.json holds one operating characteristic per machine fingerprint
(instruments/history.py's machine_fingerprint id), and every verdict quotes the one of
the machine it runs on ("false alarms: 1 of 20 [0.1-25 %]; +10 % caught 9 of 10"), or says
that there is none. Plain data in, plain data out: loadtests/calibrate.py measures.

A machine's entry:
  {"machine": fingerprint, "machine_id", "command", "date", "commit", "settings",
   "min_rounds", "max_rounds", "seconds_per_run", "seconds_per_comparison", "shared",
   "arms": {key: {"label", "env", "slowdown", "effect": {figure key: measured ratio},
                  "real": {"called_worse", "comparisons", "rounds_used"},
                  "pooled": {"called_worse", "comparisons", "rounds_used"}}}}
The arm "aa" is head against itself: its "called_worse" are false alarms.
"""

import json
import math
import os

from instruments.page import REPORTS_ROOT
from instruments.provenance import ROOT

CALIBRATION_PATH = os.path.join(REPORTS_ROOT, "calibration.json")
# A calibration kept with the docs (one machine's entry, as docs/results.md shows it): a
# fresh clone on that machine quotes it until a calibration of its own is made.
KEPT_PATH = os.path.join(ROOT, "docs", "runs", "calibration.json")
A_A = "aa"
Z95 = 1.959964


def wilson(count, total, z=Z95):
    """The 95 % Wilson score interval of a proportion count / total, as (low, high)."""
    if not total:
        return 0.0, 1.0
    share = count / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def load(path=CALIBRATION_PATH):
    """{"machines": {id: entry}} (empty when there is no file or it cannot be read)."""
    try:
        with open(path) as data:
            calibration = json.load(data)
    except (OSError, ValueError):
        return {"machines": {}}
    if isinstance(calibration, dict) and calibration.get("machine_id"):
        return {"machines": {calibration["machine_id"]: calibration}}   # one machine's entry, as kept
    if not isinstance(calibration, dict) or not isinstance(calibration.get("machines"), dict):
        return {"machines": {}}
    return calibration


def save(entry, path=CALIBRATION_PATH):
    """Keep `entry` as its machine's calibration (any other machine's stays)."""
    calibration = load(path)
    calibration["machines"][entry["machine_id"]] = entry
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as out:
        json.dump(calibration, out, indent=1, sort_keys=True, default=str)
    os.replace(path + ".tmp", path)
    return calibration


def for_machine(fingerprint, path=CALIBRATION_PATH, kept_path=KEPT_PATH):
    """This machine's entry (its own calibration's, else the one kept with the docs), or None:
    a calibration of another machine says nothing of this one."""
    for source in (path, kept_path):
        entry = load(source)["machines"].get(fingerprint["id"]) if source else None
        if entry is not None:
            return entry
    return None


def counted(result, word):
    """"3 of 20" of a {"called_worse", "comparisons"}, with its interval for false alarms."""
    count, total = result["called_worse"], result["comparisons"]
    if word == "false alarms":
        low, high = wilson(count, total)
        return "%d of %d [%.0f-%.0f%%]" % (count, total, low * 100, high * 100)
    return "%d of %d" % (count, total)


def quote(entry):
    """One line: the false alarms and the slowdowns caught, real comparisons first, then the
    estimate from pooled rounds, with where and how the calibration was made."""
    parts = []
    for key, arm in entry["arms"].items():
        word = "false alarms" if key == A_A else "%s caught" % arm["label"]
        counts = ["%s real" % counted(arm["real"], word)] if arm.get("real", {}).get("comparisons") else []
        if arm.get("pooled", {}).get("comparisons"):
            counts.append("%s pooled" % counted(arm["pooled"], word))
        parts.append("%s: %s" % (word, ", ".join(counts) or "none measured"))
    settings = entry.get("settings") or {}
    took = entry.get("seconds_per_comparison")
    return "on this machine (calibrated %s at %s, %s, rounds %s to %s%s): %s" % (
        entry.get("date", "?")[:10], (entry.get("commit") or "?")[:12],
        " ".join("%s=%s" % (name.upper(), settings[name]) for name in sorted(settings)),
        entry.get("min_rounds"), entry.get("max_rounds"),
        ", %.0f s a comparison" % took if took else "", "; ".join(parts))


def quote_for(fingerprint, settings=None, path=CALIBRATION_PATH, kept_path=KEPT_PATH):
    """What a verdict says of its error rates on this machine."""
    entry = for_machine(fingerprint, path, kept_path)
    if entry is None:
        return ("no calibration for this machine (%s): how often this verdict is wrong here is not known; "
                "`make load-calibrate` measures it" % fingerprint["id"])
    return quote(entry)
