"""`make regress`: a regression gate on the Event-based broadcast path.

Runs the pytest-benchmark suite in bench/benchmarks/ and compares its medians with the
baseline saved on this machine (pytest-benchmark keeps one per machine and Python).

- No baseline yet, or --accept: run the suite and save it as the baseline, then run it
  once more and measure each median's noise: how far it moved between the two runs of
  an unchanged tree, or the interquartile range of its rounds relative to the median
  in either run, whichever is larger. Each benchmark's threshold is three times its
  noise, never below FLOOR_PERCENT nor above CEILING_PERCENT, saved beside the baseline
  (threshold.json):
  a quiet in-process benchmark gets a tight gate, a noisy socket one a loose one.
  A missing baseline is not a failure.
- Otherwise: run the suite with --benchmark-compare (pytest-benchmark's own table) and
  --benchmark-compare-fail=median:<the loosest threshold>%, then check every median
  against its own threshold, print what changed, and exit non-zero when any median got
  slower than its threshold allows.

    python -m bench.regress            # compare (first run: save the baseline)
    python -m bench.regress --accept   # take the current figures as the baseline, on purpose
"""

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_STORAGE = os.path.join(ROOT, ".benchmarks")
BASELINE_NAME = "baseline"
FLOOR_PERCENT = 25.0
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


def spreads(json_path):
    """Each benchmark's interquartile range over its rounds, as a fraction of its median."""
    with open(json_path) as data:
        return {bench["fullname"]: bench["stats"]["iqr"] / bench["stats"]["median"]
                for bench in json.load(data)["benchmarks"]}


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
    spread = spreads(saved_baselines(storage)[-1])
    print("regress: running once more to measure the run-to-run noise of the medians", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        again_json = os.path.join(scratch, "again.json")
        code = run_suite(storage, ["--benchmark-json=" + again_json], select)
        if code != 0:
            return code
        again = medians(again_json)
        again_spread = spreads(again_json)
    # The noise of a median: how far it moved between the two runs, or the spread of the
    # rounds inside either run (a loaded machine shows it there first), whichever is larger.
    moves = {name: max(abs(again[name] / baseline[name] - 1), spread[name], again_spread.get(name, 0)) * 100
             for name in baseline if name in again}
    thresholds = {name: min(CEILING_PERCENT, max(FLOOR_PERCENT, NOISE_FACTOR * move))
                  for name, move in moves.items()}
    with open(threshold_path(storage), "w") as out:
        json.dump({"threshold_percent": thresholds, "noise_percent": moves, "noise_factor": NOISE_FACTOR,
                   "floor_percent": FLOOR_PERCENT, "ceiling_percent": CEILING_PERCENT}, out, indent=2)
    print("regress: the noise of each median, and the gate it gets:")
    for name in sorted(moves):
        print("  %-40s noise %5.1f%%  fails beyond +%.0f%%"
              % (name.split("::")[-1][-40:], moves[name], thresholds[name]))
    return 0


def compare(storage, select, env=None):
    baselines = saved_baselines(storage)
    number = os.path.basename(baselines[-1]).split("_", 1)[0]
    with open(threshold_path(storage)) as data:
        thresholds = json.load(data)["threshold_percent"]
    loosest = max(thresholds.values()) if thresholds else CEILING_PERCENT
    with tempfile.TemporaryDirectory() as scratch:
        now_json = os.path.join(scratch, "now.json")
        code = run_suite(storage, ["--benchmark-compare=" + number,
                                   "--benchmark-compare-fail=median:%d%%" % math.ceil(loosest),
                                   "--benchmark-json=" + now_json], select, env=env)
        if not os.path.exists(now_json):
            print("regress: the benchmarks did not run (exit %d)" % code)
            return code or 1
        now = medians(now_json)
    baseline = medians(baselines[-1])
    print("\nregress: medians against the baseline %s" % os.path.basename(baselines[-1]))
    print("%-52s %12s %12s %9s %6s  %s" % ("benchmark", "baseline ms", "now ms", "change", "gate", "verdict"))
    for name in sorted(now):
        if name not in baseline:
            print("%-52s %12s %12.3f %9s  new (not gated)" % (name.split("::")[-1][-52:], "-", now[name] * 1000, "-"))
            continue
        change = (now[name] / baseline[name] - 1) * 100
        threshold = thresholds.get(name, CEILING_PERCENT)
        verdict = "ok"
        if change > threshold:
            verdict = "SLOWER, FAILS"
            code = code or 1
        print("%-52s %12.3f %12.3f %+8.1f%% %5.0f%%  %s" % (name.split("::")[-1][-52:], baseline[name] * 1000,
                                                            now[name] * 1000, change, threshold, verdict))
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
