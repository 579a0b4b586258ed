"""When a comparison has run enough rounds (`make load BASE=`): the stopping rule, pure.

ROUNDS rounds are run first; then the figures are judged after every round (a "look")
until a figure's interval lies wholly above its threshold (worse), or every figure's lies
wholly on one side of it (the others below: not worse), or MAX_ROUNDS rounds have run, or
the next round would pass TIME_LIMIT.

Looking after every round and stopping at the first interval past the threshold would
raise the false-alarm rate: each look is one more chance for noise to cross it (at 4
looks of 95 % intervals, about 5 % of figures sitting exactly at their threshold were
called worse instead of 2.5 %). So the looks are fixed in number before the first round,
K = MAX_ROUNDS - ROUNDS + 1, and the two-sided 5 % is spent over them in fixed shares
(Bonferroni's inequality with unequal weights): the last look gets three quarters of it
(a 96.25 % interval), the K - 1 earlier ones share the last quarter (98.33 % each at the
defaults). The chance that any look calls a figure worse that is not past its threshold is
at most the sum of the looks' one-sided shares, 2.5 %, however the looks correlate; fewer
looks (TIME_LIMIT, an early stop) only lower it. Spending most at the last look keeps
nearly the power of a single look at MAX_ROUNDS (an equal split lost a tenth of it) while a
clear regression still stops early. tests/harness/test_stopping.py measures it by simulation.
"""

import math
import random

from instruments.measures import ratio_interval

ALPHA = 0.05   # two-sided, per figure: a 95 % interval when there is a single look
LAST_LOOK_SHARE = 0.75   # of ALPHA, spent at the last look; the earlier looks share the rest


def looks(min_rounds, max_rounds):
    """How many times the figures are judged: after every round from the minimum on."""
    return max(1, max_rounds - min_rounds + 1)


def look_confidence(min_rounds, max_rounds, rounds_run, alpha=ALPHA):
    """The confidence of the interval judged after `rounds_run` rounds: its share of alpha
    (the last look's LAST_LOOK_SHARE, an earlier one's an equal part of the rest)."""
    count = looks(min_rounds, max_rounds)
    if count == 1:
        return 1 - alpha
    if rounds_run >= max_rounds:
        return 1 - alpha * LAST_LOOK_SHARE
    return 1 - alpha * (1 - LAST_LOOK_SHARE) / (count - 1)


def resolved(entry):
    """Whether a judged figure's interval lies wholly on one side of its threshold: above
    it (worse), or below it (not worse: more rounds would not make it worse)."""
    if "low" not in entry:
        return True   # not compared: more rounds do not help either
    limit = 1 + entry["threshold_percent"] / 100.0
    return entry["low"] > limit or entry["high"] < limit


def why_stop(result, rounds_run, min_rounds, max_rounds, elapsed_s, round_s, time_limit_s):
    """None to run another round, else why the comparison stops here. `result`: compare.judge's
    of the rounds so far; `round_s`: the seconds a round has taken (the longest so far)."""
    if rounds_run < min_rounds:
        return None
    if result.get("invalid_rounds"):
        return "a round is not valid"
    if result.get("wrong_in_head") and any(result["wrong_in_head"].values()):
        return "head got messages wrong"
    worse = [entry["label"] for entry in result["figures"].values() if entry.get("verdict") == "worse"]
    if worse:
        # the sequential test's decision: a look's interval past the threshold rejects
        return "worse after %d rounds: %s" % (rounds_run, ", ".join(worse))
    open_figures = [entry["label"] for entry in result["figures"].values() if not resolved(entry)]
    if not open_figures:
        return "every figure resolved its threshold after %d rounds" % rounds_run
    if rounds_run >= max_rounds:
        return "MAX_ROUNDS=%d reached; not resolved: %s" % (max_rounds, ", ".join(open_figures))
    if time_limit_s and elapsed_s + round_s > time_limit_s:
        return "another round would pass TIME_LIMIT=%gs; not resolved: %s" % (time_limit_s, ", ".join(open_figures))
    return None


def sequential_verdict(ratios, threshold_percent, min_rounds, max_rounds, confidence=None, resamples=0):
    """The stopping rule on one figure's stream of per-round ratios: ("worse" | "not worse" |
    "open", rounds used); `confidence` fixed for every look instead of look_confidence's.
    resamples=0 takes Student's t interval alone, which is never
    wider than the comparison's (the bootstrap's widened to it): a false-alarm rate
    measured with it bounds the comparison's from above."""
    limit = 1 + threshold_percent / 100.0
    for count in range(min_rounds, min(max_rounds, len(ratios)) + 1):
        level = look_confidence(min_rounds, max_rounds, count) if confidence is None else confidence
        _ratio, low, high = ratio_interval(ratios[:count], confidence=level, resamples=resamples)
        if low > limit:
            return "worse", count
        if high < limit:
            return "not worse", count
    return "open", min(max_rounds, len(ratios))


def simulated(trials, min_rounds, max_rounds, noise, seed, confidence=None, shift_percent=None,
              threshold_percent=5.0):
    """(called worse, mean rounds used) of `trials` simulated comparisons of one figure whose
    true change is `shift_percent` (default: exactly its threshold, the worst case for a
    false alarm: any "worse" is wrong). Per-round log ratios are normal with sd `noise`;
    seeded."""
    draw = random.Random(seed)
    shift = math.log(1 + (threshold_percent if shift_percent is None else shift_percent) / 100.0)
    worse = used = 0
    for _ in range(trials):
        ratios = [math.exp(draw.gauss(shift, noise)) for _ in range(max_rounds)]
        verdict, rounds = sequential_verdict(ratios, threshold_percent, min_rounds, max_rounds, confidence)
        worse += verdict == "worse"
        used += rounds
    return worse, used / trials


def simulated_false_alarms(trials, min_rounds, max_rounds, noise, seed, **settings):
    """How many of simulated()'s comparisons were called worse."""
    return simulated(trials, min_rounds, max_rounds, noise, seed, **settings)[0]


SIMULATED = (("one look at ROUNDS=3", 3, 3, None), ("a look after every round, 3 to 6, 95 % each", 3, 6, 0.95),
             ("the stopping rule: 3 to 6, 5 % spent a quarter over the first 3 looks, three quarters at the last",
              3, 6, None),
             ("one look at ROUNDS=6", 6, 6, None))


def simulation_table(trials=4000, noise=0.06):
    """docs/results.md's table of the stopping rule, simulated (seeded: the same on any machine)."""
    lines = ["| design | false alarms at the threshold | +15 % caught | +20 % caught | rounds, A/A |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for label, low, high, confidence in SIMULATED:
        cells = ["%.1f %%" % (simulated(trials, low, high, noise, seed=seed, confidence=confidence,
                                        shift_percent=shift)[0] / trials * 100)
                 for seed, shift in ((7, None), (11, 15.0), (11, 20.0))]
        cells.append("%.1f" % simulated(trials, low, high, noise, seed=13, confidence=confidence,
                                        shift_percent=0.0)[1])
        lines.append("| %s | %s |" % (label, " | ".join(cells)))
    return lines


def main(argv=None):
    import argparse
    argparse.ArgumentParser(description="Print docs/results.md's table of the stopping rule, simulated (seeded: "
                                        "the same on any machine).").parse_args(argv)
    print("\n".join(simulation_table()))


if __name__ == "__main__":
    main()
