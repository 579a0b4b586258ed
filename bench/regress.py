"""`make regress`: two gates on what answering a poll costs.

Instruction counts (`make regress`): runs bench/callgrind_workload.py under
`valgrind --tool=callgrind` and compares instructions per parked poll, per answered
poll, per poll in all and per post with the committed baseline,
bench/baselines/callgrind.json. Each figure is the difference between two sizes of one
phase (fan-outs to 1000 and 3000 polls, bursts of 200 and 600 posts) divided by the
difference in size, so start-up and whatever one fan-out costs whatever its size cancel.
The counts repeat to within a few hundredths of a percent on one machine, so each
figure is gated at +3 %. `make regress-accept` measures twice and rewrites the baseline,
on purpose.

A/B (`make regress BASE=<git rev>`): bench/ab.py times the base revision and this tree
side by side, in alternating pairs (wall-clock time; no baseline needed).

    python -m bench.regress                     # the instruction gate
    python -m bench.regress --accept            # rewrite bench/baselines/callgrind.json
    python -m bench.regress --base origin/main  # the A/B gate (bench/ab.py)

Exit status, the same for both gates:
  0  passed
  1  a figure grew beyond its gate (the table names it and by how much)
  2  nothing could be measured (valgrind missing, the workload failed, a bad revision)
  3  not comparable: the baseline was taken with other versions of Python, gevent,
     bottle, greenlet or the C library, named in the message. Neither a pass nor a
     regression: accept a baseline for these versions, or gate where it was taken.
"""

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata

from bench.callgrind_workload import PHASE_MARKER
from instruments.page import new_report_dir
from instruments.provenance import bench_environment, cpu_model, git, provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(ROOT, "bench", "baselines", "callgrind.json")

PASSED, GREW, UNMEASURED, NOT_COMPARABLE = 0, 1, 2, 3

GATE_PERCENT = 3.0
# Two runs of an unchanged tree must agree this closely for a baseline to be accepted:
# a gate at 3 % needs figures that repeat far better than that.
REPEAT_LIMIT_PERCENT = 0.5
FAN_OUTS = (1000, 3000)
POSTS = (200, 600)
HASH_SEED = "0"
WORKLOAD_TIMEOUT = 600  # seconds; a run takes about 30 here

# (key, what one unit is) in the order the table lists them
FIGURES = (
    ("poll_parked", "instructions per parked poll: connection, request read, route, park"),
    ("poll_answered", "instructions per answered poll: wake, answer, send, close"),
    ("poll", "instructions per poll, parked and answered"),
    ("post", "instructions per post: connection, request, checks, publish, answer, close"),
)
# What makes two sets of counts comparable at all: other versions run other code.
COMPARABLE = ("python", "gevent", "bottle", "greenlet", "machine", "libc")


def versions():
    return {
        # major.minor: the interpreter's code; a rebuild of the same release (the stamp in
        # sys.version) runs the same instructions and must not void the baseline
        "python": "%s %d.%d" % (platform.python_implementation(), *sys.version_info[:2]),
        "gevent": metadata.version("gevent"),
        "bottle": metadata.version("bottle"),
        "greenlet": metadata.version("greenlet"),
        "machine": platform.machine(),
        "libc": " ".join(platform.libc_ver()),
    }


def recorded_with():
    """Context for whoever reads the baseline; not part of comparability."""
    valgrind = shutil.which("valgrind")
    return {
        "valgrind": subprocess.run([valgrind, "--version"], capture_output=True, text=True).stdout.strip()
        if valgrind else None,
        "cpu": cpu_model(),
        "commit": git("rev-parse", "HEAD", check=False),
        "tree_changed": bool(git("status", "--porcelain", "--untracked-files=no", check=False)),
    }


# -- measuring ------------------------------------------------------------------------------

class Unmeasured(Exception):
    """The workload could not be measured; the message says why."""


def workload_environment():
    """A fixed, small environment, so the counts do not depend on whose shell ran them
    (os.environ and the interpreter's start-up read it all): a fixed hash seed (str
    hashes decide dict and set layouts, and so how many probes a lookup costs), one
    locale, and no PYTHON* or other variables, but for the CHATTLE_BENCH_* knobs."""
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": HASH_SEED}
    env.update(bench_environment())
    return env


def compile_sources():
    """Byte-compile the project's modules before the measured run, so that it always
    loads them compiled. A run that compiled them itself allocated more before the
    phases, every object after landed elsewhere in memory, and where objects lie decides
    which of them share a slot of the interpreter's attribute cache: the first run after
    an edit counted 0.2 % more per parked poll than the next."""
    sources = [os.path.join(ROOT, name) for name in sorted(os.listdir(ROOT))
               if name.startswith("chattle") and name.endswith(".py")]
    compiled = subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "bench"), *sources],
                              capture_output=True, text=True, timeout=120)
    if compiled.returncode != 0:
        raise Unmeasured("byte-compiling the sources failed:\n" + (compiled.stdout + compiled.stderr)[-2000:])


def measure(fan_outs=FAN_OUTS, posts=POSTS, keep=None):
    """Run the workload under callgrind once; {"phases": [...], "figures": {...}}."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise Unmeasured("valgrind is not installed: `make regress` installs it, "
                         "or run python3 -m harness.system_packages valgrind")
    with open(sys.executable, "rb") as interpreter:
        if interpreter.read(2) == b"#!":
            raise Unmeasured("%s is a script, not the interpreter; callgrind would count the script's "
                             "shell. Run from the project's virtualenv (make regress)" % sys.executable)
    out_dir = keep or tempfile.mkdtemp(prefix="chattle-callgrind-")
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "callgrind.out*")):
        os.remove(old)
    compile_sources()
    argv = [valgrind, "--tool=callgrind", "--dump-before=" + PHASE_MARKER,
            "--callgrind-out-file=" + os.path.join(out_dir, "callgrind.out"),
            "--log-file=" + os.path.join(out_dir, "valgrind.log"),
            sys.executable, "-m", "bench.callgrind_workload",
            "--fan-outs", ",".join(map(str, fan_outs)), "--posts", ",".join(map(str, posts))]
    try:
        try:
            run = subprocess.run(argv, cwd=ROOT, env=workload_environment(), capture_output=True, text=True,
                                 timeout=WORKLOAD_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise Unmeasured("the workload did not finish within %d s under callgrind" % WORKLOAD_TIMEOUT)
        if run.returncode != 0:
            raise Unmeasured("the workload failed under callgrind (exit %d):\n%s"
                             % (run.returncode, (run.stderr or run.stdout)[-3000:]))
        phases = phase_totals(out_dir)
    finally:
        if keep is None:
            shutil.rmtree(out_dir, ignore_errors=True)
    expected = 1 + 2 * len(fan_outs) + len(posts)  # start-up, park and answer per fan-out, post per burst
    if len(phases) < expected + 1:
        raise Unmeasured("callgrind wrote %d dumps, the workload has %d phases: did it measure python "
                         "itself, and does the workload still mark its phases with %s()?"
                         % (len(phases), expected + 1, PHASE_MARKER))
    return {"phases": phases, "figures": figures_from(phases, fan_outs, posts)}


def phase_totals(out_dir):
    """Instructions of each dump, in the order written: part 1 is start-up and warm-up,
    each later part one phase, the last one teardown."""
    by_part = {}
    for path in glob.glob(os.path.join(out_dir, "callgrind.out*")):
        part = total = None
        with open(path) as dump:
            for line in dump:
                if line.startswith("part:"):
                    part = int(line.split()[1])
                elif line.startswith("totals:"):
                    total = int(line.split()[1])
        if part is not None and total is not None:
            by_part[part] = total
    return [by_part[part] for part in sorted(by_part)]


def figures_from(phases, fan_outs, posts):
    """Per-operation figures: the difference of the first and last size of each phase."""
    parks = {n: phases[1 + 2 * i] for i, n in enumerate(fan_outs)}
    answers = {n: phases[2 + 2 * i] for i, n in enumerate(fan_outs)}
    bursts = {n: phases[1 + 2 * len(fan_outs) + i] for i, n in enumerate(posts)}

    def per_unit(totals):
        small, large = min(totals), max(totals)
        return (totals[large] - totals[small]) / (large - small)

    parked, answered = per_unit(parks), per_unit(answers)
    return {"poll_parked": round(parked), "poll_answered": round(answered),
            "poll": round(parked + answered), "post": round(per_unit(bursts))}


# -- the baseline -----------------------------------------------------------------------------

def load_baseline(path):
    with open(path) as data:
        return json.load(data)


def differing_versions(baseline_versions, now):
    return [(name, baseline_versions.get(name), now.get(name)) for name in COMPARABLE
            if baseline_versions.get(name) != now.get(name)]


def record(measured, sizes, **extra):
    """What a baseline file holds (and --report-json writes: it can serve as one)."""
    return dict({
        "about": "Instructions per operation under callgrind (bench/callgrind_workload.py), written by "
                 "`make regress-accept` and compared by `make regress`: a figure more than gate_percent above "
                 "its baseline fails. Other versions of the software below are not comparable.",
        "versions": versions(),
        "recorded_with": recorded_with(),
        "sizes": sizes,
        "hash_seed": HASH_SEED,
        "gate_percent": GATE_PERCENT,
        "figures": measured["figures"],
        "phases": measured["phases"],
        "units": dict(FIGURES),
    }, **extra)


def write_record(path, content):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as out:
        json.dump(content, out, indent=2)
        out.write("\n")


def accept(path):
    print("regress: measuring twice under callgrind for a new baseline (about a minute)", flush=True)
    first, second = measure(), measure()
    moved = {key: abs(second["figures"][key] / first["figures"][key] - 1) * 100 for key, _ in FIGURES}
    worst = max(moved.values())
    print("%-14s %12s %12s %9s  %s" % ("figure", "first run", "second run", "apart", "what"))
    for key, what in FIGURES:
        print("%-14s %12s %12s %8.3f%%  %s" % (key, spaced(first["figures"][key]), spaced(second["figures"][key]),
                                               moved[key], what))
    if worst > REPEAT_LIMIT_PERCENT:
        print("regress: NOT ACCEPTED: two runs of this tree differ by %.3f%%, more than %.1f%%; something in the "
              "measured process depends on the machine's state (time, load)" % (worst, REPEAT_LIMIT_PERCENT))
        return UNMEASURED
    sizes = {"fan_outs": list(FAN_OUTS), "posts": list(POSTS)}
    write_record(path, record(first, sizes, repeat={"figures": second["figures"],
                                                    "largest_difference_percent": round(worst, 4)}))
    print("regress: baseline written to %s (two runs agree within %.3f%%); commit it"
          % (shown(path), worst))
    return PASSED


def shown(path):
    """A path as the reader best finds it: relative inside the project, else absolute."""
    relative = os.path.relpath(path, ROOT)
    return path if relative.startswith("..") else relative


def spaced(number):
    return "{:,}".format(int(round(number))).replace(",", " ")


def compare(path, report_json=None, keep=None):
    if not os.path.exists(path):
        print("regress: no baseline at %s: `make regress-accept` takes one (then commit it)"
              % shown(path))
        return NOT_COMPARABLE
    baseline = load_baseline(path)
    now_versions = versions()
    differ = differing_versions(baseline["versions"], now_versions)
    if differ:
        print("regress: NOT COMPARABLE: %s was taken with other versions than this run has:"
              % shown(path))
        for name, then, now in differ:
            print("  %-9s baseline %s\n  %-9s here     %s" % (name, then, "", now))
        print("Instruction counts differ between versions whatever the code does, so this is neither a pass "
              "nor a regression (exit %d). Run the gate where the baseline was taken, or take a baseline "
              "for these versions with `make regress-accept` and commit it." % NOT_COMPARABLE)
        return NOT_COMPARABLE
    sizes = baseline["sizes"]
    tweaks = bench_environment()
    if tweaks:
        print("regress: note: %s set: the measured process does what it asks"
              % ", ".join("%s=%s" % item for item in tweaks.items()))
    print("regress: counting instructions under callgrind (fan-outs %s, posts %s; about 30 s)"
          % (" and ".join(map(str, sizes["fan_outs"])), " and ".join(map(str, sizes["posts"]))), flush=True)
    run_provenance = provenance()
    now = measure(sizes["fan_outs"], sizes["posts"], keep)
    gate = baseline.get("gate_percent", GATE_PERCENT)
    grew, faster = [], []
    print("\nregress: instructions per operation, against %s (gate +%g%% per figure)"
          % (shown(path), gate))
    print("%-14s %12s %12s %9s  %-8s %s" % ("figure", "baseline", "now", "change", "verdict", "what"))
    for key, what in FIGURES:
        then, current = baseline["figures"][key], now["figures"][key]
        change = (current / then - 1) * 100
        verdict = "ok"
        if change > gate:
            verdict = "GREW"
            grew.append((key, change))
        elif change < -gate:
            faster.append(key)
        print("%-14s %12s %12s %+8.2f%%  %-8s %s" % (key, spaced(then), spaced(current), change, verdict, what))
    verdicts = {key: "GREW" if key in dict(grew) else "ok" for key, _what in FIGURES}
    written = record(now, sizes, provenance=run_provenance, baseline_path=shown(path),
                     baseline_figures=baseline["figures"], baseline_recorded_with=baseline.get("recorded_with"),
                     verdicts=verdicts, passed=not grew)
    report_dir = new_report_dir("regress")
    write_record(os.path.join(report_dir, "regress.json"), written)
    print("regress: figures in %s" % shown(os.path.join(report_dir, "regress.json")))
    if report_json:
        write_record(report_json, written)
    if grew:
        print("regress: FAILED: %s grew beyond +%g%%. If the change is meant to cost this, accept it on purpose: "
              "make regress-accept, and commit bench/baselines/callgrind.json with it."
              % (", ".join("%s by %+.1f%%" % item for item in grew), gate))
        return GREW
    if faster:
        print("regress: passed; %s fell by more than %g%%: `make regress-accept` locks the gain in"
              % (", ".join(faster), gate))
    else:
        print("regress: passed")
    return PASSED


def main(argv=None):
    parser = argparse.ArgumentParser(description="Regression gates on the cost of answering polls",
                                     epilog="exit status: 0 passed, 1 a figure grew beyond its gate, "
                                     "2 could not measure, 3 not comparable (see the message)")
    parser.add_argument("--accept", action="store_true",
                        help="measure twice and rewrite the baseline, on purpose")
    parser.add_argument("--baseline", default=BASELINE, help="baseline file (default %(default)s)")
    parser.add_argument("--base", metavar="REV",
                        help="instead: time REV and this tree side by side (bench/ab.py; its flags follow)")
    parser.add_argument("--report-json", help="also write the figures measured here to this file")
    parser.add_argument("--keep", metavar="DIR",
                        help="keep callgrind's dumps here, one per phase (read them with callgrind_annotate)")
    args, rest = parser.parse_known_args(argv)
    if args.base:
        from bench import ab
        return ab.main(["--base", args.base, *rest])
    if rest:
        parser.error("unrecognized arguments: %s" % " ".join(rest))
    try:
        if args.accept:
            return accept(os.path.abspath(args.baseline))
        return compare(os.path.abspath(args.baseline), args.report_json, args.keep)
    except Unmeasured as exc:
        print("regress: could not measure: %s" % exc)
        return UNMEASURED


if __name__ == "__main__":
    sys.exit(main())
