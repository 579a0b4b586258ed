"""`make regress`: a regression gate on the Event-based broadcast path.

Runs the pytest-benchmark suite in bench/benchmarks/ and compares its medians with the
baseline saved on this machine (pytest-benchmark keeps one per machine and Python).

- No baseline yet, or --accept: run the suite and save it as the baseline, then run it
  once more and measure how far each median moved between two runs of an unchanged
  tree. The gate's threshold is three times the largest such move, never below
  FLOOR_PERCENT nor above CEILING_PERCENT, and is saved beside the baseline.
  A missing baseline is not a failure.
- Otherwise: run the suite with --benchmark-compare-fail=median:<threshold>%, print what
  changed, and exit non-zero when any median got slower by more than the threshold.

    python -m bench.regress            # compare (first run: save the baseline)
    python -m bench.regress --accept   # take the current figures as the baseline, on purpose
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_STORAGE = os.path.join(ROOT, ".benchmarks")
BASELINE_NAME = "baseline"
FLOOR_PERCENT = 20.0
CEILING_PERCENT = 100.0
NOISE_FACTOR = 3.0


def run_suite(storage, extra, select=None, env=None):
    argv = [sys.executable, "-m", "pytest", os.path.join(ROOT, "bench", "benchmarks"), "-q",
            "-p", "no:cacheprovider", "--benchmark-storage=file://" + storage,
            "--benchmark-columns=min,median,iqr,max,rounds", "--benchmark-sort=name", *extra]
    if select:
        argv += ["-k", select]
    return subprocess.call(argv, cwd=ROOT, env=env)


def medians(json_path):
    with open(json_path) as data:
        return {bench["fullname"]: bench["stats"]["median"] for bench in json.load(data)["benchmarks"]}


def saved_baselines(storage):
    return sorted(glob.glob(os.path.join(storage, "*", "*_%s.json" % BASELINE_NAME)))


def threshold_path(storage):
    return os.path.join(storage, "threshold.json")


def accept(storage, select):
    os.makedirs(storage, exist_ok=True)
    print("regress: saving a new baseline in %s" % storage, flush=True)
    code = run_suite(storage, ["--benchmark-save=" + BASELINE_NAME], select)
    if code != 0:
        print("regress: the benchmarks failed (exit %d); no baseline saved" % code)
        return code
    baseline = medians(saved_baselines(storage)[-1])
    print("regress: running once more to measure the run-to-run noise of the medians", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        again_json = os.path.join(scratch, "again.json")
        code = run_suite(storage, ["--benchmark-json=" + again_json], select)
        if code != 0:
            return code
        again = medians(again_json)
    moves = {name: abs(again[name] / baseline[name] - 1) * 100 for name in baseline if name in again}
    worst = max(moves.values()) if moves else 0.0
    threshold = min(CEILING_PERCENT, max(FLOOR_PERCENT, NOISE_FACTOR * worst))
    with open(threshold_path(storage), "w") as out:
        json.dump({"threshold_percent": threshold, "noise_percent": moves, "noise_factor": NOISE_FACTOR,
                   "floor_percent": FLOOR_PERCENT, "ceiling_percent": CEILING_PERCENT}, out, indent=2)
    print("regress: medians moved by at most %.1f%% between two runs; the gate fails beyond %.0f%%"
          % (worst, threshold))
    return 0


def compare(storage, select, env=None):
    baselines = saved_baselines(storage)
    number = os.path.basename(baselines[-1]).split("_", 1)[0]
    with open(threshold_path(storage)) as data:
        threshold = json.load(data)["threshold_percent"]
    with tempfile.TemporaryDirectory() as scratch:
        now_json = os.path.join(scratch, "now.json")
        code = run_suite(storage, ["--benchmark-compare=" + number,
                                   "--benchmark-compare-fail=median:%g%%" % threshold,
                                   "--benchmark-json=" + now_json], select, env=env)
        if not os.path.exists(now_json):
            print("regress: the benchmarks did not run (exit %d)" % code)
            return code or 1
        now = medians(now_json)
    baseline = medians(baselines[-1])
    print("\nregress: medians against the baseline %s (gate: %.0f%% slower)" % (os.path.basename(baselines[-1]),
                                                                               threshold))
    print("%-52s %12s %12s %9s  %s" % ("benchmark", "baseline ms", "now ms", "change", "verdict"))
    for name in sorted(now):
        if name not in baseline:
            print("%-52s %12s %12.3f %9s  new (not gated)" % (name[-52:], "-", now[name] * 1000, "-"))
            continue
        change = (now[name] / baseline[name] - 1) * 100
        verdict = "SLOWER, FAILS" if change > threshold else "ok"
        print("%-52s %12.3f %12.3f %+8.1f%%  %s" % (name[-52:], baseline[name] * 1000, now[name] * 1000,
                                                    change, verdict))
    print("regress: %s" % ("FAILED: the broadcast path got slower beyond the gate" if code else "passed"))
    return code


def main(argv=None):
    parser = argparse.ArgumentParser(description="Regression gate on the broadcast path (pytest-benchmark)")
    parser.add_argument("--accept", action="store_true",
                        help="save the current figures as the new baseline and re-measure the noise")
    parser.add_argument("--storage", default=DEFAULT_STORAGE,
                        help="where baselines are kept (default %(default)s)")
    parser.add_argument("-k", dest="select", help="only the benchmarks matching this pytest -k expression")
    args = parser.parse_args(argv)
    storage = os.path.abspath(args.storage)
    if args.accept or not saved_baselines(storage) or not os.path.exists(threshold_path(storage)):
        if not args.accept:
            print("regress: no baseline on this machine yet: this run saves one (not a failure)")
        return accept(storage, args.select)
    return compare(storage, args.select)


if __name__ == "__main__":
    sys.exit(main())
