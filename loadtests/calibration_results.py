"""docs/results.md's calibration entry, made from the calibration's own JSON, so that a
figure and its provenance cannot part.

    python -m loadtests.calibration_results docs/runs/calibration.json

`make load-calibrate` writes reports/<timestamp>-calibrate/calibration.json (this
machine's entry of reports/calibration.json); copy it to docs/runs/calibration.json and
paste what this prints into docs/results.md. tests/test_docs.py fails when the two differ.
"""

import argparse
import json
import math
import sys

from loadtests.calibration import A_A, wilson

FIGURE_NAMES = (("server_us_per_delivery", "CPU"), ("wakeup_p50_ms", "p50"), ("wakeup_p99_ms", "p99"),
                ("kib_per_held_poll", "memory"))


def share(result):
    count, total = result["called_worse"], result["comparisons"]
    if not total:
        return "none"
    low, high = wilson(count, total)
    return "%d of %d (%.0f-%.0f %%)" % (count, total, low * 100, high * 100)


def effect(arm):
    return ", ".join("%s %+.1f %%" % (name, (arm["effect"][key] - 1) * 100) for key, name in FIGURE_NAMES
                     if arm["effect"].get(key))


def spread(entry, arm=A_A):
    """Per figure, the standard deviation of log(arm / plain) over the rounds, as a percentage:
    the noise of one round's ratio on this machine."""
    result = {}
    for key, _name in FIGURE_NAMES:
        logs = [math.log(figures[arm][key] / figures["base"][key]) for figures in
                (entry_round["figures"] for entry_round in entry.get("rounds", ()))
                if figures.get(arm, {}).get(key) and figures.get("base", {}).get(key)]
        if len(logs) >= 2:
            mean = sum(logs) / len(logs)
            result[key] = (math.exp(math.sqrt(sum((value - mean) ** 2 for value in logs) / (len(logs) - 1))) - 1) * 100
    return result


def section(entry):
    """The entry's lines: what was run, when, on which commit and machine, then the table."""
    machine = entry["machine"]
    minutes, seconds = divmod(round(entry["elapsed_s"]), 60)
    lines = [
        "`%s` ([compare.md](compare.md#how-often-it-is-wrong-make-load-calibrate)) — %s UTC, commit %s, "
        "%s (%d cores), machine fingerprint %s; %d rounds of %d runs in %d min %d s (%.0f s a run), "
        "%d round(s) run again; the machine was shared (other sessions' tests and measurements ran "
        "between rounds: the measurement lock was released after each). Comparisons as `make load BASE=` makes them, "
        "ROUNDS=%d to MAX_ROUNDS=%d; pooled: %d per arm drawn from the same rounds (seed %d)." % (
            entry["command"], entry["date"][:16].replace("T", " "), entry["commit"][:7], machine.get("cpu_model"),
            machine.get("cores") or 0, entry["machine_id"], entry["calibration_rounds"], len(entry["arms"]) + 1,
            minutes, seconds, entry["seconds_per_run"] or 0, entry.get("discarded_rounds", 0),
            entry["min_rounds"], entry["max_rounds"], entry["pooled_per_arm"], entry["pooled_seed"]),
        "",
        "| arm | what it changed (all rounds) | called worse, real comparisons | called worse, pooled "
        "| rounds a comparison took (pooled) | rounds left out (not valid) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for key, arm in entry["arms"].items():
        lines.append("| %s%s | %s | %s | %s | %s | %d |" % (
            arm["label"], " (false alarms)" if key == A_A else "", effect(arm) or "-", share(arm["real"]),
            share(arm["pooled"]), "%.1f" % arm["pooled"]["rounds_used"] if arm["pooled"].get("rounds_used") else "-",
            arm.get("invalid_rounds", 0)))
    noise = spread(entry)
    lines += ["", "Time per comparison: %.0f s (the pooled A/A comparisons' mean rounds, two runs each). "
              "A/A spread of one round's head / base (standard deviation of its log): %s." % (
                  entry["seconds_per_comparison"] or 0,
                  ", ".join("%s %.1f %%" % (name, noise[key]) for key, name in FIGURE_NAMES if key in noise) or "-")]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("calibration", help="a calibration.json that make load-calibrate wrote (one machine's)")
    args = parser.parse_args(argv)
    with open(args.calibration) as source:
        entry = json.load(source)
    print("\n".join(section(entry)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
