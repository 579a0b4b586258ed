"""The stages of a load run, as data (no Locust import: the orchestrator uses it too).

Every process (the orchestrator, Locust's master and each Locust worker) computes the
same table from the same knobs, so posters know when a burst stage is on without any
message from the master.
"""

import functools
import math
import os

# Seconds a stage needs at least; shorter runs squeeze the burst stage, never these.
HOLD_SECONDS = 8      # everyone held, nothing posted: the idle cost of a held poll
DRAIN_SECONDS = 6     # posters quiet, listeners still polling: the last posts arrive
RAMP_DOWN_SECONDS = 3  # at least; more when stopping every listener at --stop-rate takes longer
# After the table: seconds the shape waits at most for every listener to catch up and
# report its ledger, before it ends the run anyway (the stragglers count as gave up).
SETTLE_SECONDS = 30
# In the master's --raw-dir: the wall-clock time of the stages' 0 s, written by the shape
# when it starts (after the master waited for its workers), read by the orchestrator.
SHAPE_STARTED_FILE = "shape_started"


def build_stages(listeners, posters, duration, spawn_rate, stop_rate=2500):
    """[{name, start, end, users, spawn_rate, posting}], covering `duration` seconds.

    ramp: listeners (and the few posters) connect; hold: nobody posts, so the held
    polls and RSS are the idle figures; bursts: posters post bursts; drain: posters
    stop, listeners receive the rest; ramp-down: everyone leaves, at `stop_rate` a second,
    each listener catching up on what is still on its way before it goes.
    """
    users = listeners + posters
    ramp = max(2, math.ceil(users / spawn_rate)) + 2
    ramp_down = max(RAMP_DOWN_SECONDS, math.ceil(users / stop_rate) + 1)
    fixed = ramp + HOLD_SECONDS + DRAIN_SECONDS + ramp_down
    bursts = duration - fixed
    if bursts < 3:
        raise ValueError("a %gs run cannot ramp %d users at %g/s, hold, burst and drain: give it at least %ds"
                         % (duration, users, spawn_rate, fixed + 3))
    stages = []
    start = 0.0
    for name, length, count, posting in (("ramp", ramp, users, False), ("hold", HOLD_SECONDS, users, False),
                                         ("bursts", bursts, users, True), ("drain", DRAIN_SECONDS, users, False),
                                         ("ramp-down", ramp_down, 0, False)):
        stages.append({"name": name, "start": start, "end": start + length, "users": count,
                       "spawn_rate": spawn_rate if count else stop_rate, "posting": posting})
        start += length
    return stages


# SHAPE=steps: each step holds its listeners, sends one burst, then waits for the answers
# and for the workers' reports (every 3 s) to reach the master, which judges the step.
STEP_HOLD_SECONDS = 3
STEP_BURST_SECONDS = 2
STEP_SETTLE_SECONDS = 8


def build_step_stages(step, most, posters, spawn_rate, stop_rate=2500):
    """[{name, start, end, users, spawn_rate, posting, step, listeners}]: listeners added
    `step` at a time up to `most`, each step a ramp, a hold, one burst and a settling wait,
    then the ramp-down. The shape may end the run at an earlier step (loadtests/shapes.py)."""
    if step < 1 or most < 1:
        raise ValueError("--step and --users must each be at least 1")
    stages, start, listeners, number = [], 0.0, 0, 0
    while listeners < most:
        number += 1
        added = min(step, most - listeners) + (posters if number == 1 else 0)
        listeners = min(most, listeners + step)
        for name, length, posting in (("ramp", math.ceil(added / spawn_rate) + 2, False),
                                      ("hold", STEP_HOLD_SECONDS, False), ("bursts", STEP_BURST_SECONDS, True),
                                      ("settle", STEP_SETTLE_SECONDS, False)):
            stages.append({"name": name, "start": start, "end": start + length, "users": listeners + posters,
                           "spawn_rate": spawn_rate, "posting": posting, "step": number, "listeners": listeners})
            start += length
    ramp_down = max(RAMP_DOWN_SECONDS, math.ceil((listeners + posters) / stop_rate) + 1)
    stages.append({"name": "ramp-down", "start": start, "end": start + ramp_down, "users": 0,
                   "spawn_rate": stop_rate, "posting": False})
    return stages


def stage_at(stages, elapsed):
    for stage in stages:
        if stage["start"] <= elapsed < stage["end"]:
            return stage
    return None


def room_name(index):
    return "load-%d" % index


@functools.lru_cache(maxsize=8)
def server_urls(urls):
    """The server URLs of a comma-separated --host or --servers, without trailing slashes
    (cached: every listener's start asks)."""
    return tuple(url.strip().rstrip("/") for url in urls.split(",") if url.strip())


LOCUST_CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "locust.conf")
