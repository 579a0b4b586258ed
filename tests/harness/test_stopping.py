"""make load BASE='s stopping rule, its random order and its canary (loadtests/stopping.py,
harness/sides.py, instruments/canary.py): the false-alarm rate of the sequential looks
measured by a seeded simulation, so the same figures every run."""

import random

import pytest

from harness.sides import in_random_order
from instruments.canary import canary_line, canary_moved, read_canary
from loadtests import compare, stopping
from tests.harness.test_compare import noisy_rounds

TRIALS = 4000
# Each run's noise on a figure, as a log ratio: 6 %, above the 5 % threshold of CPU per
# delivery, so that noise alone often carries an interval across it.
NOISE = 0.06


def test_looks_are_fixed_before_the_first_round_and_share_the_false_alarm_budget():
    assert stopping.looks(3, 6) == 4 and stopping.looks(3, 3) == 1 and stopping.looks(5, 3) == 1
    assert stopping.look_confidence(3, 3, 3) == pytest.approx(0.95)
    assert stopping.look_confidence(3, 6, 3) == stopping.look_confidence(3, 6, 5) == pytest.approx(1 - 0.0125 / 3)
    assert stopping.look_confidence(3, 6, 6) == pytest.approx(1 - 0.0375)
    # the one-sided shares of the four looks add up to 2.5 %
    assert sum((1 - stopping.look_confidence(3, 6, rounds)) / 2 for rounds in range(3, 7)) == pytest.approx(0.025)


def test_the_stopping_rule_keeps_its_false_alarm_rate_in_a_seeded_simulation():
    """A figure whose true change sits exactly at its threshold: any "worse" is a false
    alarm. One look of a 95 % interval calls it worse in 2.5 % of comparisons; looking
    after every round from 3 to 6 with the same interval calls it worse about twice as
    often, and the looks' shares of the 5 % bring it back under 2.5 % (2.3 %; 4000 trials,
    a binomial standard error of 0.25 %)."""
    one_look = stopping.simulated_false_alarms(TRIALS, 3, 3, NOISE, seed=7) / TRIALS
    naive = stopping.simulated_false_alarms(TRIALS, 3, 6, NOISE, seed=7, confidence=0.95) / TRIALS
    corrected = stopping.simulated_false_alarms(TRIALS, 3, 6, NOISE, seed=7) / TRIALS
    assert 0.015 <= one_look <= 0.035, one_look
    assert naive > 0.04, naive
    assert corrected <= 0.025, corrected


def test_the_simulation_is_seeded():
    assert stopping.simulated_false_alarms(300, 3, 6, NOISE, seed=3) == \
        stopping.simulated_false_alarms(300, 3, 6, NOISE, seed=3)


def test_a_real_slowdown_is_caught_more_often_than_at_a_fixed_minimum():
    """+20 % against a 5 % threshold with 6 % noise: the rounds added where the intervals do
    not resolve give back more power than the wider intervals take (98 % caught against
    56 % by 3 rounds and one look)."""
    # simulated_false_alarms counts the comparisons called worse: here each is a catch
    sequential = stopping.simulated_false_alarms(TRIALS, 3, 6, NOISE, seed=11, shift_percent=20.0) / TRIALS
    fixed = stopping.simulated_false_alarms(TRIALS, 3, 3, NOISE, seed=11, shift_percent=20.0) / TRIALS
    assert sequential >= 0.85 and sequential > fixed + 0.2, (sequential, fixed)


def judged(rounds, min_rounds=3, max_rounds=6):
    return compare.judge(rounds, confidence=stopping.look_confidence(min_rounds, max_rounds, len(rounds)))


def test_fewer_than_the_minimum_rounds_never_stop():
    assert stopping.why_stop(judged(noisy_rounds(2)), 2, 3, 6, 0, 60, 0) is None


def test_every_figure_resolved_stops():
    quiet = judged(noisy_rounds(3, factor=1.0, noise=0.002))
    assert "every figure resolved" in stopping.why_stop(quiet, 3, 3, 6, 0, 60, 0)
    slow = judged(noisy_rounds(3, factor=1.6, noise=0.002))
    assert slow["code"] == compare.WORSE
    assert "worse after 3 rounds: server CPU per delivery" in stopping.why_stop(slow, 3, 3, 6, 0, 60, 0)


def test_an_open_figure_asks_for_another_round_until_max_rounds_or_the_time_limit():
    noisy = judged(noisy_rounds(3, factor=1.05, noise=0.08))
    assert stopping.why_stop(noisy, 3, 3, 6, 0, 60, 0) is None
    assert "MAX_ROUNDS=6 reached" in stopping.why_stop(noisy, 6, 3, 6, 0, 60, 0)
    assert "TIME_LIMIT=100s" in stopping.why_stop(noisy, 3, 3, 6, 50, 60, 100)
    assert stopping.why_stop(noisy, 3, 3, 6, 30, 60, 100) is None


def test_an_invalid_round_stops_at_once():
    rounds = noisy_rounds(3, noise=0.08)
    rounds[1]["head"]["machine_check"]["machine_bound"] = True
    assert stopping.why_stop(judged(rounds), 3, 3, 6, 0, 60, 0) == "a round is not valid"


def test_the_order_of_each_round_is_drawn_from_a_seed():
    sides = ("base", "head")

    def orders(seed):
        draw = random.Random(seed)
        return [in_random_order(sides, draw) for _ in range(40)]
    assert orders(5) == orders(5)
    assert orders(5) != orders(6)
    firsts = [order[0] for order in orders(5)]
    assert 10 <= firsts.count("base") <= 30  # both orders, by chance, not by turns
    alternating = [sides if index % 2 == 0 else sides[::-1] for index in range(40)]
    assert orders(5) != alternating


def test_the_canary_moved_is_the_slowest_reading_over_the_fastest():
    readings = [{"loop_s": 0.020, "others_percent": 5, "steal_percent": 0},
                {"loop_s": 0.025, "others_percent": 90, "steal_percent": 1.5},
                {"loop_s": 0.021, "others_percent": 10, "steal_percent": 0}]
    assert canary_moved(readings) == pytest.approx(0.25)
    assert canary_moved(readings[:1]) == 0.0
    assert "moved 25%" in canary_line(readings) and "steal up to 1.5%" in canary_line(readings)


def test_a_canary_reading_times_the_loop_and_reads_the_others():
    reading = read_canary(repeats=3, squares=20_000)
    assert reading["loop_s"] > 0 and reading["window_s"] > 0
    assert reading["others_percent"] >= 0 and reading["steal_percent"] >= 0


def test_results_md_shows_the_simulation_as_it_is_now():
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "docs", "results.md")) as page:
        text = page.read()
    block = text.split("<!-- made by: python -m loadtests.stopping -->\n", 1)[1].split("\n<!-- end -->", 1)[0]
    assert block == "\n".join(stopping.simulation_table()), (
        "docs/results.md's stopping-rule table is not what `python -m loadtests.stopping` prints: paste it there")
