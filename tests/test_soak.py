"""`make soak`: its judgement on figures made up here, what it found in the product,
and (slow) a short soak of this tree, clean and with a deliberate leak.

The short soak judges slopes as `make soak` does, on fewer listeners and a shorter run
(SHORT below); the clean tree must pass it and the leaking one fail, naming the figures
that grew.
"""

import os

import pytest

import chattle
from bench import soak

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the judgement ----------------------------------------------------------------------------

def test_a_flat_exact_count_passes_and_one_that_grows_by_one_per_minute_fails():
    flat = [(t, 6) for t in range(0, 300, 10)]
    growing = [(t, 6 + t // 60) for t in range(0, 300, 10)]
    assert soak.judge("descriptors", soak.EXACT, flat, 290, 100)["passed"]
    verdict = soak.judge("descriptors", soak.EXACT, growing, 290, 100)
    assert not verdict["passed"] and verdict["rise_high"] > soak.COUNT_TOLERANCE


def test_one_descriptor_opened_once_is_within_the_tolerance_wherever_it_falls():
    for step_at in (10, 150, 280):
        points = [(t, 6 + (t >= step_at)) for t in range(0, 300, 10)]
        assert soak.judge("descriptors", soak.EXACT, points, 290, 100)["passed"], step_at


def test_memory_is_judged_per_held_connection_hour():
    held = 1000
    within = [(t, 50e6 + t * (0.5 * soak.RSS_GATE * held / 3600)) for t in range(0, 300, 10)]
    beyond = [(t, 50e6 + t * (2 * soak.RSS_GATE * held / 3600)) for t in range(0, 300, 10)]
    assert soak.judge("rss", soak.MEMORY, within, 290, held)["passed"]
    assert not soak.judge("rss", soak.MEMORY, beyond, 290, held)["passed"]


def test_the_line_and_its_interval():
    line = soak.fit_line([(0, 1.0), (1, 3.0), (2, 5.0), (3, 7.0)])
    assert line["slope"] == pytest.approx(2.0) and line["intercept"] == pytest.approx(1.0)
    assert line["half_width"] == pytest.approx(0.0, abs=1e-9)
    assert soak.t_quantile(10) == pytest.approx(2.228, rel=0.005)
    assert soak.t_quantile(30) == pytest.approx(2.042, rel=0.005)


# -- what the soak found ----------------------------------------------------------------------

def test_a_room_emptied_by_the_retained_bound_while_a_poll_was_held_is_forgotten():
    """A left room whose messages the retained-bytes bound trimmed while a poll still
    waited there was skipped ever after (empty rooms may be loading), and stayed in the
    worker for good: one room per room ever left, the soak's "rooms above live"."""
    chattle.configure(chattle.Settings(max_retained_bytes=20000))
    try:
        bus, rooms = chattle.get_bus(), chattle.rooms
        for _ in range(30):
            bus.publish("left", "ann", "x" * 80)
        rooms.get("left").waiting = 1      # a poll still held there when the bound is reached
        for _ in range(200):
            bus.publish("live", "ann", "x" * 80)
        rooms.get("left").waiting = 0      # it times out: nobody waits any more
        for _ in range(200):
            bus.publish("live", "ann", "x" * 80)
        assert "left" not in rooms.by_name
        assert "live" in rooms.by_name and rooms.retained_bytes <= 20000
    finally:
        chattle.configure(chattle.Settings())
