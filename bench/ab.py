"""`make regress BASE=<git rev>`: time a base revision and this tree side by side.

Wall-clock time on a shared machine drifts with whatever else runs, so a figure is
never compared with one taken earlier: the base is checked out into a temporary git
worktree, and base and this tree ("head") are measured in alternating pairs (base then
head, head then base, ...), each run on a fresh server of its own, by this tree's
client code. What a drift does to one side it does to the other within a pair.

Per run, on one `python chattle.py` of that side:
- socket fan-out: a few hundred polls held on blocking sockets of this process, one
  post, the time until the last answer is read, per waiter (median of a few rounds);
- rig: a few thousand polls parked by bench/rig.py's client processes, one post, the
  time from the post to the last answer (last delivery), per waiter (median of three).

Each figure is reported as head / base, the geometric mean of the pairs' ratios, with a
95 % bootstrap confidence interval. The gate fails when head is slower with the
interval's lower bound above +5 %: slower beyond doubt, not just in one noisy pair.

The sides are harness/sides.py's, as `make load BASE=` has them: the base runs on the same
virtualenv when its server dependencies (pyproject.toml's [project] dependencies) equal
this tree's, else on a virtualenv made for it in the temporary directory; CHATTLE_BENCH_*
variables of the environment and --head-env reach head's servers only; one hash seed for
all. The worktree and everything else temporary is removed at the end, also on failure,
Ctrl-C or SIGTERM.

    python -m bench.regress --base HEAD~1
    python -m bench.regress --base origin/main --pairs 9 --rig-polls 5000
"""

import argparse
import json
import os
import sys
import time

from bench.rig import Rig, answer_polls, hold_polls
from harness.processes import ROOT, ChattleServer
from harness.sides import (
    BaseCheckout,
    Unmeasured,
    assignments,
    base_and_head,
    in_turn,
    parse_head_env,
    scratch_directory,
)
from instruments.measures import percentile, ratio_interval

PASSED, SLOWER, UNMEASURED = 0, 1, 2
GATE_PERCENT = 5.0

# (key, label) in the order the table lists them; every one is gated
FIGURES = (
    ("socket_us", "socket fan-out, us per waiter"),
    ("rig_us", "rig last delivery, us per waiter"),
)


# -- one pair: a server of each side, fan-outs alternating between them ---------------------

def start(side, log_dir, pair):
    """A server of `side` (harness/sides.py), its chattle whatever the virtualenv installed."""
    return ChattleServer(root=side.root, python=side.python, environ=side.env, env={"PYTHONPATH": side.root},
                         log_path=os.path.join(log_dir, "%s-%d.log" % (side.name, pair)))


def socket_fan_out(server, polls):
    held = hold_polls(server.url, "ab-socket", polls)
    seconds, answered = answer_polls(server.url, "ab-socket", held)
    if answered != polls:
        raise Unmeasured("%d of %d socket polls answered" % (answered, polls))
    return seconds / polls * 1e6


def rig_fan_out(server, polls):
    point = Rig(server.url, room="ab-rig").run(polls, server_pids=[server.pid])
    if point["delivered"] != polls:
        raise Unmeasured("the rig delivered %d of %d" % (point["delivered"], polls))
    return point["last_delivery_s"] / polls * 1e6


def measure_pair(sides, args, log_dir, pair):
    """Start one server of each side; run each fan-out on both, alternating which goes
    first, so that the two runs of a round are a second apart whatever the machine does
    meanwhile. {figure key: {"base": [per round], "head": [per round]}}."""
    order = in_turn(sides, pair)
    servers = {}
    try:
        for side in order:
            servers[side.name] = start(side, log_dir, pair)
        for side in order:  # one unmeasured fan-out each, to warm the server up
            socket_fan_out(servers[side.name], args.socket_polls)
        rounds = {key: {"base": [], "head": []} for key, _label in FIGURES}
        for key, measure, polls, count in (("socket_us", socket_fan_out, args.socket_polls, args.socket_rounds),
                                           ("rig_us", rig_fan_out, args.rig_polls, args.rig_rounds)):
            for round_number in range(count):
                for side in in_turn(order, round_number):
                    rounds[key][side.name].append(measure(servers[side.name], polls))
        return rounds
    finally:
        for server in servers.values():
            server.stop()


def pair_ratio(rounds):
    """head / base of one pair: the median of its rounds' ratios (a round that a burst of
    other work hit on one side only is outvoted)."""
    return percentile(sorted(h / b for b, h in zip(rounds["base"], rounds["head"])), 0.5)


# -- the verdict ----------------------------------------------------------------------------

def verdict(pairs, gate):
    """Print the table; SLOWER when any figure's lower bound is above +gate %."""
    print("\nab: head / base over %d pairs (geometric mean of the pairs' ratios, 95%% bootstrap interval; "
          "fails when the interval's lower bound is above +%g%%)" % (len(pairs), gate))
    print("%-34s %10s %10s %9s  %-19s %s" % ("figure", "base", "head", "head/base", "95% interval", "verdict"))
    slower = []
    for key, label in FIGURES:
        ratio, low, high = ratio_interval([pair_ratio(pair[key]) for pair in pairs])
        word = "ok"
        if low > 1 + gate / 100:
            word = "SLOWER"
            slower.append("%s %+.1f%% (interval %+.1f%% to %+.1f%%)"
                          % (label.split(",")[0], (ratio - 1) * 100, (low - 1) * 100, (high - 1) * 100))
        elif high < 1 - gate / 100:
            word = "faster"
        medians = [percentile(sorted(value for pair in pairs for value in pair[key][side]), 0.5)
                   for side in ("base", "head")]
        print("%-34s %10.1f %10.1f %+8.1f%%  %+6.1f%% to %+6.1f%%   %s"
              % (label, medians[0], medians[1], (ratio - 1) * 100, (low - 1) * 100, (high - 1) * 100, word))
    print("(base, head: the median of every round of that side)")
    if slower:
        print("ab: FAILED: head is slower than base: %s" % "; ".join(slower))
        return SLOWER
    print("ab: passed")
    return PASSED


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time a base revision and this tree side by side",
                                     epilog="exit status: 0 passed, 1 head slower beyond the gate, "
                                     "2 could not measure")
    parser.add_argument("--base", required=True, help="git revision to compare with (a branch, tag or commit)")
    parser.add_argument("--pairs", type=int, default=7, help="base/head pairs (default %(default)s)")
    parser.add_argument("--socket-polls", type=int, default=200, help="polls per socket fan-out (default %(default)s)")
    parser.add_argument("--socket-rounds", type=int, default=5,
                        help="socket fan-outs per side and pair (default %(default)s)")
    parser.add_argument("--rig-polls", type=int, default=3000, help="polls of the rig's fan-out (default %(default)s)")
    parser.add_argument("--rig-rounds", type=int, default=3,
                        help="rig fan-outs per side and pair (default %(default)s)")
    parser.add_argument("--gate", type=float, default=GATE_PERCENT,
                        help="fail when head/base's lower bound is above +this %% (default %(default)s)")
    parser.add_argument("--head-env", action="append", default=[], metavar="NAME=VALUE",
                        help="set this for head's servers only, as CHATTLE_BENCH_* of the environment are "
                             "(how the tests slow head down)")
    parser.add_argument("--json", metavar="FILE", help="also write every run's figures here")
    args = parser.parse_args(argv)
    if args.pairs < 2:
        parser.error("--pairs must be at least 2 for an interval")
    try:
        head_env = parse_head_env(args.head_env)
    except ValueError as exc:
        parser.error(str(exc))

    started = time.monotonic()
    try:
        with scratch_directory("chattle-ab-") as scratch, BaseCheckout(args.base, scratch) as checkout:
            return run_pairs(args, checkout, head_env, scratch, started)
    except (Unmeasured, RuntimeError) as exc:
        print("ab: could not measure: %s" % exc)
        return UNMEASURED
    except KeyboardInterrupt:
        print("ab: interrupted; the base's worktree is removed")
        return 130


def run_pairs(args, checkout, head_env, scratch, started):
    """Measure the pairs and print the verdict; its exit status."""
    checkout.check_out()
    print("ab: base %s (%s) in %s, on %s; head is this tree, %s" % (
        args.base, checkout.commit[:12], checkout.root, checkout.venv_note, ROOT), flush=True)
    sides = base_and_head(checkout, ROOT, head_env)
    bench_env = sides[1].bench_env
    if bench_env:
        print("ab: head's servers get %s" % assignments(bench_env))
    pairs = []
    for pair in range(args.pairs):
        pairs.append(measure_pair(sides, args, scratch, pair))
        print("ab: pair %d/%d: head/base socket %+.1f%%, rig %+.1f%%" % (
            pair + 1, args.pairs, (pair_ratio(pairs[-1]["socket_us"]) - 1) * 100,
            (pair_ratio(pairs[-1]["rig_us"]) - 1) * 100), flush=True)
    code = verdict(pairs, args.gate)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"pairs": pairs, "base_commit": checkout.commit, "head_env": bench_env, "verdict": code},
                      out, indent=1)
    print("ab: %d pairs in %.0f s" % (args.pairs, time.monotonic() - started))
    return code


if __name__ == "__main__":
    sys.exit(main())
