"""`make load-calibrate`: how often `make load BASE=` is wrong on this machine.

This tree is run against itself (A/A: every verdict other than unchanged is a false
alarm) and against itself slowed on purpose: CHATTLE_BENCH_EXTRA_WORK squares per poll
answer for about 5, 10 and 20 % more server CPU per delivery, and
CHATTLE_BENCH_STAMP_EARLY_MS for a change of wake-up latency alone (every message stamped
4 ms early; harness/bench_server.py). A calibration round runs the plain tree once and every arm
once, in an order drawn at random per round, each run a complete `make load` on a fresh
server, with the canary read before and after each run (a round that is not valid or
whose canary moved is run again once); every arm's run is paired with the round's plain
run.

Comparisons are then made of these rounds exactly as `make load BASE=` makes them (the
same judge, the same stopping rule from ROUNDS to MAX_ROUNDS rounds):
  real    consecutive rounds, each round in one comparison only, in the order they ran;
  pooled  many comparisons, each the rounds drawn in a random order (seeded) from all
          of them: more comparisons than the machine time allows, from the same runs.
Both are kept, side by side, so that the pooled estimate can be checked against the
real comparisons. The operating characteristic goes to reports/calibration.json under
this machine's fingerprint; every later verdict on this machine quotes it.

    make load-calibrate USERS=1000 DURATION=25 BURST_GAP=1 CALIBRATION_ROUNDS=10 TIME_LIMIT=1800

LOCK=<file> takes that file's lock (flock) for each round and releases it between rounds,
so that other measurements on a shared machine get their turns.
"""

import argparse
import datetime
import fcntl
import math
import os
import random
import sys
import time

from harness.sides import Side, copy_of_this_tree, scratch_directory
from instruments import history
from instruments.canary import canary_line, canary_moved, read_canary
from instruments.page import REPORTS_ROOT, new_report_dir, write_json
from instruments.provenance import git
from loadtests import calibration
from loadtests.compare import FIGURES, ROUND_MARGIN_SECONDS, judge, round_line, round_problems, run_round
from loadtests.options import BY_NAME
from loadtests.stopping import look_confidence, why_stop

EXTRA_WORK = "CHATTLE_BENCH_EXTRA_WORK"
STAMP_EARLY = "CHATTLE_BENCH_STAMP_EARLY_MS"
# The arms: (key, label, environment of its server, the slowdown it aims at). 190 squares
# made about 15 % more server CPU per delivery at 1000 listeners (docs/results.md).
# Every side, the plain one too, runs through harness/bench_server.py (a CHATTLE_BENCH_*
# variable set, even to 0, starts the server through it): with plain `chattle.py` as the
# base, an arm with nothing but the wrapper (the latency arm) came out about 15 % more CPU per
# delivery than the base, so that every CPU arm measured the wrapper as well as its work.
PLAIN = {EXTRA_WORK: "0"}
ARMS = (
    (calibration.A_A, "A/A", PLAIN, None),
    ("cpu5", "+5 % CPU", {EXTRA_WORK: "63"}, "server CPU per delivery +5 %"),
    ("cpu10", "+10 % CPU", {EXTRA_WORK: "127"}, "server CPU per delivery +10 %"),
    ("cpu20", "+20 % CPU", {EXTRA_WORK: "253"}, "server CPU per delivery +20 %"),
    ("latency", "+4 ms latency", {STAMP_EARLY: "4"}, "wake-up latency +4 ms (about +20 % p50), nothing else"),
)
POOLED_SEED = 29
POOLED_RESAMPLES = 1000   # the bootstrap's, per interval: thousands of comparisons are judged


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="make load-calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-rounds", type=int, default=10, help="rounds at most (default 10)")
    parser.add_argument("--time-limit", type=float, default=1800.0,
                        help="no round is started that would end after this many seconds (default 1800)")
    # The comparisons' own: the same defaults as make load BASE='s (loadtests/options.py)
    for name in ("rounds", "max-rounds", "order-seed", "canary-threshold"):
        option = BY_NAME[name]
        parser.add_argument(option.flag, type=option.kind, default=option.default, help=option.help)
    parser.add_argument("--pooled", type=int, default=200, help="pooled comparisons per arm (default 200)")
    parser.add_argument("--lock", default="", help="a file whose lock each round takes (flock)")
    parser.add_argument("--output", default=calibration.CALIBRATION_PATH)
    parser.add_argument("--report-root", default=REPORTS_ROOT)
    parser.add_argument("--rejudge", metavar="DIR", nargs="+", default=[],
                        help="run nothing: make the comparisons again from the runs of the calibration in DIR "
                             "(reports/<timestamp>-calibrate), as this tree judges them, and keep the result")
    return parser.parse_known_args(argv)


class RoundLock:
    """The shared measurement lock for one round, released between rounds."""

    def __init__(self, path):
        self.path, self.handle = path, None

    def __enter__(self):
        if self.path:
            self.handle = open(self.path, "a")
            fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *_exc):
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


# -- from rounds to comparisons (pure: tests give it made-up rounds) ---------------------------

def pairs_of(rounds, arm):
    """Each calibration round as a comparison's round for `arm`: the plain run as base."""
    return [{"base": entry["runs"]["base"], "head": entry["runs"][arm]} for entry in rounds]


def sequential(pairs, min_rounds, max_rounds, resamples):
    """The verdict word of a comparison that takes `pairs` one at a time, as make load BASE=
    would, and the rounds it used."""
    taken = []
    result = None
    for pair in pairs[:max_rounds]:
        taken.append(pair)
        if len(taken) < min_rounds:
            continue
        result = judge(taken, confidence=look_confidence(min_rounds, max_rounds, len(taken)), resamples=resamples)
        if why_stop(result, len(taken), min_rounds, max_rounds, 0.0, 0.0, 0.0):
            break
    return (result["word"] if result else "TOO FEW ROUNDS"), len(taken)


def real_comparisons(pairs, min_rounds, max_rounds, resamples):
    """Consecutive comparisons over `pairs`, none sharing a round; a last one that could not
    reach ROUNDS is left out."""
    words, used, start = [], [], 0
    while len(pairs) - start >= min_rounds:
        word, count = sequential(pairs[start:], min_rounds, max_rounds, resamples)
        words.append(word)
        used.append(count)
        start += count
    return words, used


def pooled_comparisons(pairs, min_rounds, max_rounds, count, seed, resamples):
    """`count` comparisons, each of the rounds in an order drawn from `seed`."""
    draw = random.Random(seed)
    words, used = [], []
    if len(pairs) < min_rounds:
        return words, used
    for _ in range(count):
        order = list(pairs)
        draw.shuffle(order)
        word, rounds_used = sequential(order, min_rounds, max_rounds, resamples)
        words.append(word)
        used.append(rounds_used)
    return words, used


def tally(words, used):
    return {"called_worse": sum(word == "WORSE" for word in words), "comparisons": len(words),
            "could_not_compare": sum(word == "COULD NOT COMPARE" for word in words),
            "rounds_used": (sum(used) / len(used)) if used else None}


def measured_effect(pairs):
    """Per figure, the geometric mean of head / base over every round: the slowdown an arm made."""
    effect = {}
    for figure in FIGURES:
        ratios = [figure.read(pair["head"]) / figure.read(pair["base"]) for pair in pairs
                  if pair["base"] and pair["head"] and figure.read(pair["base"]) and figure.read(pair["head"])]
        effect[figure.key] = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
    return effect


def characteristic(rounds, min_rounds, max_rounds, pooled, seed=POOLED_SEED, resamples=POOLED_RESAMPLES,
                   arms=ARMS):
    """{key: {"label", "env", "slowdown", "effect", "real", "pooled"}} of calibration rounds
    [{"runs": {"base": summary, <arm key>: summary, ...}}]."""
    result = {}
    for key, label, env, slowdown in arms:
        if any(key not in entry["runs"] for entry in rounds):
            continue   # an arm this calibration did not run
        every = pairs_of(rounds, key)
        # A pair that is not valid even when run again ends a real comparison as "could not
        # compare"; what it says of false alarms and power is nothing, so it is left out.
        pairs = [pair for pair in every if not (round_problems(pair["base"]) + round_problems(pair["head"]))]
        real = real_comparisons(pairs, min_rounds, max_rounds, resamples)
        pool = pooled_comparisons(pairs, min_rounds, max_rounds, pooled, seed, resamples)
        result[key] = {"label": label, "env": env, "slowdown": slowdown, "effect": measured_effect(pairs),
                       "invalid_rounds": len(every) - len(pairs),
                       "real": tally(*real), "pooled": tally(*pool)}
    return result


# -- the runs ----------------------------------------------------------------------------------------

def run_calibration_round(sides, number, load_argv, rounds_dir, timeout, draw):
    order = list(sides)
    draw.shuffle(order)
    entry = {"order": [side.name for side in order], "canary": [read_canary()], "runs": {}}
    for side in order:
        started = time.monotonic()
        entry["runs"][side.name], _root = run_round(side, number, load_argv, rounds_dir, timeout)
        entry["canary"].append(read_canary())
        print(round_line(number, side.name, entry["runs"][side.name]) + " (%.0f s)" % (time.monotonic() - started),
              flush=True)
    print("calibrate: round %s %s" % (number, canary_line(entry["canary"])), flush=True)
    return entry


def slim(summary):
    """What a calibration keeps of a run: the figures the verdict reads and its validity."""
    if summary is None:
        return None
    keep = ("cpu", "wakeup_latency_s", "memory", "checks", "machine_check", "other_processes_cpu_mean", "delivery",
            "posts", "deliveries", "_report_dir")
    return {key: summary.get(key) for key in keep}


def rounds_of_report(report_dir, kept):
    """The calibration rounds of a finished calibration's report (`kept`: its calibration.json),
    each the last attempt of its number (a round run again is labelled 1b)."""
    import json
    rounds = []
    for number, kept_round in enumerate(kept["rounds"], 1):
        again = os.path.isdir(os.path.join(report_dir, "rounds", "%db-base" % number))
        label = "%db" % number if again else str(number)
        runs = {}
        for name in kept_round["order"]:
            path = os.path.join(report_dir, "rounds", "%s-%s" % (label, name), "latest", "summary.json")
            try:
                with open(path) as data:
                    runs[name] = slim(json.load(data))
            except (OSError, ValueError):
                runs[name] = None
        rounds.append({"order": kept_round["order"], "canary": kept["canary"][number - 1], "runs": runs})
    return rounds


def kept_calibration(report_dir, output):
    """A calibration report's own calibration.json, else its machine's entry in `output` (a
    calibration that stopped while drawing kept it only there)."""
    import json
    try:
        with open(os.path.join(report_dir, "calibration.json")) as data:
            return json.load(data)
    except OSError:
        return calibration.for_machine(history.machine_fingerprint(), output, None)


def rejudge(args):
    """The comparisons made again, as this tree judges them, from the runs of one calibration
    or of several (chunks run apart, each holding the measurement lock for a while: their
    rounds pooled in the order given)."""
    chunks = [(report_dir, kept_calibration(report_dir, args.output)) for report_dir in args.rejudge]
    rounds = [entry for report_dir, kept in chunks for entry in rounds_of_report(report_dir, kept)]
    first = chunks[0][1]
    settings = [kept["all_settings"] for _dir, kept in chunks]
    if any(other != settings[0] for other in settings):
        print("calibrate: the chunks ran with other settings: %s" % settings, file=sys.stderr)
        return 2
    provenance = {name: first[name] for name in ("machine", "date", "commit", "order_seed", "command")}
    provenance.update(judged_at=git("rev-parse", "HEAD"),
                      discarded_rounds=sum(kept.get("discarded_rounds", 0) for _dir, kept in chunks),
                      elapsed_s=sum(kept.get("elapsed_s", 0) for _dir, kept in chunks),
                      chunks=[{"report": os.path.basename(os.path.normpath(report_dir)), "date": kept["date"],
                               "commit": kept["commit"], "rounds": len(kept["rounds"]), "command": kept["command"]}
                              for report_dir, kept in chunks])
    run_seconds = [kept["seconds_per_run"] for _dir, kept in chunks for _round in kept["rounds"]
                   if kept.get("seconds_per_run")]
    entry = record(rounds, args, settings[0], provenance, run_seconds)
    if len(chunks) == 1:
        write_json(os.path.join(chunks[0][0], "calibration.json"), entry)
    print("calibrate: %s" % calibration.quote(entry))
    return 0


def main(argv=None):
    args, load_argv = parse_args(sys.argv[1:] if argv is None else argv)
    if args.rejudge:
        return rejudge(args)
    from loadtests import run
    load_args = run.parse_args(load_argv)
    _stages, problems, _notes = run.preflight(load_args)
    if problems:
        print("calibrate: preflight refused the runs:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2
    fingerprint = history.machine_fingerprint()
    order_seed = args.order_seed or random.SystemRandom().randrange(1, 2 ** 31)
    draw = random.Random(order_seed)
    started_at = datetime.datetime.now(datetime.timezone.utc)
    commit = git("rev-parse", "HEAD")
    with scratch_directory("chattle-calibrate-") as scratch:
        root = copy_of_this_tree(os.path.join(scratch, "head"))
        sides = [Side("base", root, sys.executable, PLAIN)] + [Side(key, root, sys.executable, env)
                                                        for key, _label, env, _slowdown in ARMS]
        report_dir = new_report_dir("calibrate", root=args.report_root)
        rounds_dir = os.path.join(report_dir, "rounds")
        os.makedirs(rounds_dir)
        print("calibrate: %s; up to %d rounds of %d runs (order seed %d), %g s at most; report in %s" % (
            ", ".join("%s %s" % (key, " ".join("%s=%s" % item for item in env.items()) or "(plain)")
                      for key, _label, env, _slowdown in ARMS), args.calibration_rounds, len(sides), order_seed,
            args.time_limit, report_dir), flush=True)
        timeout = load_args.duration + ROUND_MARGIN_SECONDS
        rounds, discarded, run_seconds = [], 0, []
        began, longest = time.monotonic(), 0.0
        for number in range(1, args.calibration_rounds + 1):
            if args.time_limit and time.monotonic() - began + longest > args.time_limit:
                print("calibrate: another round would pass the time limit; stopping after %d" % len(rounds))
                break
            for attempt in range(2):
                with RoundLock(args.lock):
                    round_started = time.monotonic()   # the wait for the lock is not the round's
                    entry = run_calibration_round(sides, "%d%s" % (number, "b" if attempt else ""), load_argv,
                                                  rounds_dir, timeout, draw)
                took = time.monotonic() - round_started
                longest = max(longest, took)
                run_seconds.append(took / len(sides))
                invalid = [problem for summary in entry["runs"].values() for problem in round_problems(summary)]
                moved = canary_moved(entry["canary"])
                entry["canary_flagged"] = moved * 100 > args.canary_threshold
                if not (invalid or entry["canary_flagged"]) or attempt:
                    break
                print("calibrate: round %d again: %s" % (number, (invalid or ["the canary moved %.0f%%" % (
                    moved * 100)])[0]), flush=True)
                discarded += 1
            entry["runs"] = {name: slim(summary) for name, summary in entry["runs"].items()}
            rounds.append(entry)
    settings = history.load_settings(vars(load_args), environ={})
    entry = record(rounds, args, settings, {"machine": fingerprint, "date": started_at.isoformat(timespec="seconds"),
                                            "commit": commit, "order_seed": order_seed, "discarded_rounds": discarded,
                                            "elapsed_s": time.monotonic() - began,
                                            "command": as_make_command(sys.argv[1:] if argv is None else argv)},
                   run_seconds)
    write_json(os.path.join(report_dir, "calibration.json"), entry)
    print("calibrate: %s" % calibration.quote(entry))
    print("calibrate: written to %s (and calibration.png beside it)" % args.output)
    return 0


def as_make_command(argv):
    """`make load-calibrate NAME=value ...` of this process's flags (--users 1000: USERS=1000)."""
    words, index = ["make", "load-calibrate"], 0
    while index < len(argv):
        name = argv[index].lstrip("-").replace("-", "_").upper()
        if index + 1 < len(argv) and not argv[index + 1].startswith("--"):
            words.append("%s=%s" % (name, argv[index + 1]))
            index += 2
        else:
            words.append("%s=1" % name)
            index += 1
    return " ".join(words)


def record(rounds, args, settings, provenance, run_seconds):
    """The machine's entry made from its calibration rounds, kept in args.output (beside it
    its chart, calibration.png); the entry."""
    arms = characteristic(rounds, args.rounds, args.max_rounds, args.pooled)
    per_run = sum(run_seconds) / len(run_seconds) if run_seconds else None
    used = arms[calibration.A_A]["pooled"]["rounds_used"] or args.rounds
    entry = dict(provenance, machine_id=provenance["machine"]["id"],
                 settings={name: settings[name] for name in ("users", "duration", "burst_gap") if name in settings},
                 all_settings=settings, min_rounds=args.rounds, max_rounds=args.max_rounds,
                 pooled_per_arm=args.pooled, pooled_seed=POOLED_SEED, calibration_rounds=len(rounds),
                 seconds_per_run=per_run, seconds_per_comparison=per_run * 2 * used if per_run else None, arms=arms,
                 shared=True, canary=[round_entry["canary"] for round_entry in rounds],
                 rounds=[{"order": round_entry["order"], "figures": {
                     name: {figure.key: figure.read(summary) if summary else None for figure in FIGURES}
                     for name, summary in round_entry["runs"].items()}} for round_entry in rounds])
    calibration.save(entry, args.output)
    draw_characteristic(entry, os.path.join(os.path.dirname(os.path.abspath(args.output)), "calibration.png"))
    return entry


def draw_characteristic(entry, path):
    """The operating characteristic: how often each arm was called worse, real and pooled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(entry["arms"])
    fig, axis = plt.subplots(figsize=(8, 3.6))
    for offset, kind, colour in ((-0.15, "real", "#1f5fbf"), (0.15, "pooled", "#e08a00")):
        shares, lows, highs = [], [], []
        for key in keys:
            result = entry["arms"][key][kind]
            share = result["called_worse"] / result["comparisons"] if result["comparisons"] else 0.0
            low, high = calibration.wilson(result["called_worse"], result["comparisons"])
            shares.append(share * 100)
            lows.append(max(0.0, share - low) * 100)     # rounding can put share a hair outside
            highs.append(max(0.0, high - share) * 100)
        axis.bar([index + offset for index in range(len(keys))], shares, width=0.3, color=colour,
                 yerr=[lows, highs], capsize=3, label="%s comparisons" % kind)
    axis.set_xticks(range(len(keys)))
    axis.set_xticklabels([entry["arms"][key]["label"] for key in keys])
    axis.set_ylabel("called worse, % of comparisons")
    axis.set_ylim(0, 105)
    axis.legend(fontsize=8)
    axis.set_title("make load BASE= on %s: false alarms (A/A) and slowdowns caught" % entry["machine_id"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
