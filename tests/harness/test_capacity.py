"""`make capacity`'s search (bench/capacity.py): its logic on fake probes, its judgement of a
run on made-up rig points, and one small search end to end against a real server."""

import json
import os
import subprocess
import sys

import pytest

from bench import capacity

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def threshold_probe(limit, log=None, clock=None, seconds_per_probe=0.0):
    """A probe that passes up to `limit` polls, recording what it was asked."""
    def probe(count):
        if log is not None:
            log.append(count)
        if clock is not None:
            clock.now += seconds_per_probe
        return {"passed": count <= limit}
    return probe


# -- the probe's repeats ------------------------------------------------------------------------

@pytest.mark.parametrize("outcomes, passed, runs", [
    ([True, True], True, 2),            # decided after two: no third run
    ([False, False], False, 2),
    ([True, False, True], True, 3),
    ([False, True, True], True, 3),
    ([True, False, False], False, 3),
    ([False, True, False], False, 3),
])
def test_a_probe_passes_on_two_of_three_runs_and_stops_once_decided(outcomes, passed, runs):
    calls = []

    def run_once(index):
        calls.append(index)
        return outcomes[index]
    verdict, results = capacity.repeated_verdict(run_once, repeats=3, needed=2)
    assert verdict is passed
    assert calls == list(range(runs))
    assert results == outcomes[:runs]


# -- the search --------------------------------------------------------------------------------

def test_the_search_steps_by_half_again_until_a_probe_fails():
    asked = []
    result = capacity.search(threshold_probe(17000, asked), start=1000, max_probes=40)
    first_fail = next(i for i, count in enumerate(asked) if count > 17000)
    growing = asked[:first_fail + 1]
    assert growing == [1000, 1500, 2250, 3375, 5063, 7595, 11393, 17090]
    assert result["probes"][first_fail]["passed"] is False


def test_the_search_bisects_until_the_bracket_is_within_five_percent():
    asked = []
    result = capacity.search(threshold_probe(17000, asked), start=1000, max_probes=40)
    low, high = result["bracket"]
    assert result["converged"] and result["stopped"] == "converged"
    assert low == result["capacity"] <= 17000 < high
    assert (high - low) <= 0.05 * low
    after = asked[8:]
    assert after and all(11393 < count < 17090 for count in after)  # between the last pass and first fail
    # each bisection halves the bracket: from 5 697 wide to within 5 % in few probes
    assert len(after) <= 5


def test_a_first_probe_that_fails_steps_down_until_one_passes():
    asked = []
    result = capacity.search(threshold_probe(700, asked), start=5000, max_probes=40)
    assert asked[:6] == [5000, 3333, 2222, 1481, 987, 658]
    assert result["converged"] and result["capacity"] <= 700 < result["bracket"][1]


def test_a_server_that_passes_nothing_has_no_capacity():
    result = capacity.search(threshold_probe(0), start=1000, max_probes=40)
    assert result["capacity"] is None and result["stopped"] == "nothing passed"
    assert min(p["count"] for p in result["probes"]) >= capacity.SMALLEST


def test_the_search_stops_at_its_probe_limit():
    asked = []
    result = capacity.search(threshold_probe(10 ** 9, asked), start=1000, max_probes=4)
    assert asked == [1000, 1500, 2250, 3375]
    assert result["stopped"] == "probe limit" and result["capacity"] == 3375 and not result["converged"]


def test_the_search_stops_at_its_time_limit():
    clock = FakeClock()
    asked = []
    result = capacity.search(threshold_probe(17000, asked, clock, seconds_per_probe=30), start=1000,
                             max_probes=40, time_limit=100, clock=clock)
    assert len(asked) == 4  # 0, 30, 60, 90 s: a fifth would start at 120 s
    assert result["stopped"] == "time limit"


def test_the_search_never_probes_past_its_ceiling():
    asked = []
    result = capacity.search(threshold_probe(10 ** 9, asked), start=10000, max_probes=40, ceiling=19800)
    assert asked == [10000, 15000, 19800]
    assert result["capacity"] == 19800 and result["stopped"] == "ceiling"


def test_the_servers_searches_take_turns_a_probe_each_and_find_what_each_finds_alone():
    asked = []

    def probe_for(name, limit):
        def probe(count):
            asked.append((name, count))
            return {"passed": count <= limit}
        return probe
    limits = {"plain": 17000, "slowed": 13000, "peer": 3000}
    together = capacity.search_together({name: probe_for(name, limit) for name, limit in limits.items()},
                                        start=5000, max_probes=40)
    assert [name for name, _count in asked[:6]] == ["plain", "slowed", "peer"] * 2
    for name, limit in limits.items():
        alone = capacity.search(probe_for(name, limit), start=5000, max_probes=40)
        assert together[name]["capacity"] == alone["capacity"] and together[name]["bracket"] == alone["bracket"]
    assert together["slowed"]["capacity"] < together["plain"]["capacity"]


def test_the_time_limit_stops_every_search_taking_turns():
    clock = FakeClock()
    probes = {name: threshold_probe(10 ** 9, clock=clock, seconds_per_probe=30) for name in ("a", "b")}
    found = capacity.search_together(probes, start=1000, max_probes=40, time_limit=100, clock=clock)
    assert [len(found[name]["probes"]) for name in ("a", "b")] == [2, 2]  # a, b, a, b at 0, 30, 60, 90 s
    assert {found[name]["stopped"] for name in found} == {"time limit"}


def test_a_slower_server_gets_a_lower_capacity_in_the_same_search():
    """A fan-out whose time grows with the waiters woken: 30 % more work per answer wakes the
    p99 waiter 30 % later, so the objective is met at fewer polls."""
    def probe_for(seconds_per_answer):
        return lambda count: {"passed": count * seconds_per_answer <= 0.5}
    plain = capacity.search(probe_for(25e-6), start=1000, max_probes=40)
    slowed = capacity.search(probe_for(25e-6 * 1.3), start=1000, max_probes=40)
    assert plain["converged"] and slowed["converged"]
    assert slowed["capacity"] < plain["capacity"]
    assert slowed["capacity"] <= 0.5 / (25e-6 * 1.3) < slowed["bracket"][1]


# -- judging a run --------------------------------------------------------------------------------

def rig_point(count=1000, **changes):
    point = {"requested": count, "parked": count, "held_confirmed": count, "delivered": count, "unanswered": 0,
             "complete_listeners": count, "connect_errors": {},
             "latency": {"count": count, "p50": 0.1, "p99": 0.3}, "client_lag": {"p99": 0.002}}
    for key, value in changes.items():
        point[key] = value
    return point


def test_a_run_within_the_objective_with_every_message_delivered_passes():
    assert capacity.run_failures(rig_point(), slo=0.5) == []


@pytest.mark.parametrize("changes, reason", [
    ({"latency": {"count": 1000, "p50": 0.2, "p99": 0.51}}, "p99 510 ms over 500 ms"),
    ({"unanswered": 3, "delivered": 997}, "unanswered: 3 polls"),
    ({"complete_listeners": 990}, "delivery: 10 answers without the message"),
    ({"client_lag": {"p99": 0.040}}, "client lag p99 40.0 ms over 10 % of p99"),
    ({"parked": 900, "connect_errors": {"EMFILE": 100}}, "hold: 900 of 1000 polls connected (EMFILE x100)"),
    ({"held_confirmed": 950}, "hold: the server confirmed 950 of 1000 polls held"),
])
def test_each_way_a_run_misses_fails_it_and_says_how(changes, reason):
    assert reason in capacity.run_failures(rig_point(**changes), slo=0.5)


def test_a_server_too_full_to_post_to_fails_on_its_hold_alone():
    full = rig_point(21000, held_confirmed=0, delivered=0, unanswered=21000, complete_listeners=0,
                     latency={"count": 0, "p50": None, "p99": None}, client_lag={"p99": None})
    assert capacity.run_failures(full, slo=0.5) == ["hold: the server confirmed 0 of 21000 polls held"]


def test_a_lag_of_a_few_milliseconds_does_not_fail_a_fast_run():
    """10 % of a 30 ms p99 is 3 ms, the rig's own read pauses; the floor is 2 % of the objective."""
    fast = rig_point(latency={"count": 1000, "p50": 0.015, "p99": 0.030}, client_lag={"p99": 0.004})
    assert capacity.run_failures(fast, slo=0.5) == []
    assert capacity.run_failures(dict(fast, client_lag={"p99": 0.011}), slo=0.5)


@pytest.mark.parametrize("errors, resource", [
    ({"EMFILE": 5}, "descriptors"), ({"EADDRNOTAVAIL": 5, "ECONNREFUSED": 1}, "ports"),
    ({"ENOBUFS": 2}, "memory"), ({}, "connect"),
])
def test_a_hold_that_runs_out_names_the_resource(errors, resource):
    assert capacity.hold_resource(rig_point(parked=990, connect_errors=errors)) == resource
    assert capacity.hold_resource(rig_point()) is None


def test_a_server_full_at_its_descriptor_limit_ran_out_of_descriptors():
    # one gunicorn worker stopped at its limit while the other held the rest
    uneven = rig_point(30000, held_confirmed=29000, held_per_pid={"11": 19800, "12": 9200})
    assert capacity.hold_resource(uneven, per_process=19800, processes=2) == "descriptors"
    # one worker sent more than it may hold answers no /stats at all
    silent = rig_point(21000, held_confirmed=0, held_per_pid={})
    assert capacity.hold_resource(silent, per_process=19800) == "descriptors"
    assert capacity.hold_resource(silent, per_process=40000) == "server"


def test_the_search_says_whether_the_hold_or_the_objective_bounds_it():
    def probe(count):
        if count > 19800:
            return {"passed": False, "runs": [{"passed": False, "hold_resource": "descriptors"}] * 2}
        return {"passed": True, "runs": [{"passed": True}] * 2}
    held = capacity.search(probe, start=5000, max_probes=40)
    assert capacity.limited_by(held) == "hold (descriptors)"
    assert held["converged"] and held["capacity"] <= 19800 < held["bracket"][1]
    def slow_or_lagging(count):
        if count < 9000:
            return {"passed": True, "runs": [{"passed": True}] * 2}
        return {"passed": False, "runs": [{"passed": False, "failures": ["p99 610 ms over 500 ms"]},
                                          {"passed": False, "failures": ["client lag p99 60.0 ms over 10 % of p99",
                                                                         "p99 530 ms over 500 ms"]}]}
    missed = capacity.search(slow_or_lagging, start=5000, max_probes=40)
    assert capacity.limited_by(missed) == "objective: p99, client lag"


def test_the_hold_ceiling_names_the_first_resource_to_run_out():
    ceilings = capacity.hold_ceilings(server_processes=1, machine_bytes_per_poll=10 ** 9)
    assert ceilings["first"] == "memory" and ceilings["polls"] < 1000
    assert set(ceilings["ceilings"]) == {"descriptors", "ports", "memory"}


def test_preflight_names_a_limit_it_cannot_raise_and_the_command():
    notes, per_process = capacity.preflight(max_polls=10 ** 8)  # far past fs.nr_open
    assert any("sysctl -w fs.nr_open=" in note for note in notes)
    assert any("nofile" in note for note in notes)
    assert 0 < per_process < 10 ** 8


def test_the_servers_are_searched_one_worker_and_the_uvloop_peer_first():
    servers = capacity.server_list([1, 2, 4], ["aiohttp on uvloop", "aiohttp reference"], slowed=240)
    assert [s["label"] for s in servers][:3] == ["Chattle, 1 worker", "aiohttp on uvloop",
                                                 "Chattle, 1 worker, slowed (+240 squares per answer)"]
    assert servers[2]["env"] == {capacity.EXTRA_WORK_VARIABLE: "240"}
    assert [s["workers"] for s in servers][3:] == ["aiohttp reference", 2, 4]


# -- end to end ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_small_search_against_a_real_server_writes_the_report(tmp_path):
    """Two probes of 100 and 150 polls on one worker with a generous objective: both pass, every
    answer carries the message, and the report has its results, chart and verdict."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(capacity.EXTRA_WORK_VARIABLE, None)
    done = subprocess.run([sys.executable, "-m", "bench.capacity", "--workers", "1", "--peers", "none",
                           "--slowed", "0", "--start", "100", "--max-probes", "2", "--slo-ms", "20000",
                           "--no-hold-check", "--time-limit", "300"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = done.stdout.strip().splitlines()[-1].split("report: ")[1].split(" (")[0]
    folder = os.path.dirname(report)
    assert os.path.exists(os.path.join(folder, "capacity.png"))
    with open(os.path.join(folder, "results.json")) as source:
        results = json.load(source)
    (server,) = results["servers"]
    probes = server["search"]["probes"]
    assert [p["count"] for p in probes] == [100, 150]
    for probe in probes:
        assert probe["passed"]
        for run in probe["runs"]:
            assert run["delivered"] == run["complete_listeners"] == run["requested"]
    assert server["search"]["capacity"] == 150 and server["search"]["stopped"] == "probe limit"
    assert results["verdict"].startswith("One worker of Chattle on this %d-core machine holds 150 long-polls with "
                                         "p99 wake-up under 20000 ms" % os.cpu_count())
    assert server["at_capacity"]["server_us_per_delivery"] is not None  # 10 ms ticks: may read 0 at 150
    from instruments import history
    with open(history.history_path()) as lines:
        (line,) = [entry for entry in map(json.loads, lines) if entry.get("report") == folder]
    assert line["kind"] == "capacity" and line["figures"]["chattle_1_worker_capacity"] == 150, line["figures"]


@pytest.mark.slow
def test_the_hold_check_holds_polls_without_a_post_on_fresh_servers(tmp_path):
    server = capacity.server_list([1], [], slowed=0)[0]
    said = []
    checks = capacity.check_hold(server, 210, None, str(tmp_path), per_process=19800, say=said.append)
    assert [c["requested"] for c in checks] == [200, 221]
    for check in checks:
        assert check["parked"] == check["held"] == check["requested"] and check["hold_resource"] is None
    assert len(said) == 2 and said[0].endswith("hold check at 200 polls: held")


# -- make load SHAPE=steps ---------------------------------------------------------------------------

def test_a_stepped_table_adds_listeners_a_step_at_a_time_with_one_burst_each():
    from loadtests.scenario import build_step_stages
    stages = build_step_stages(step=2000, most=5000, posters=1, spawn_rate=500)
    steps = [s for s in stages if "step" in s]
    assert [s["name"] for s in steps[:4]] == ["ramp", "hold", "bursts", "settle"]
    assert sorted({(s["step"], s["listeners"], s["users"]) for s in steps}) == [(1, 2000, 2001), (2, 4000, 4001),
                                                                                (3, 5000, 5001)]
    assert [s["step"] for s in steps if s["posting"]] == [1, 2, 3]
    assert stages[-1]["name"] == "ramp-down" and stages[-1]["users"] == 0
    assert all(a["end"] == b["start"] for a, b in zip(stages, stages[1:]))


def fake_tally(posts, latencies_by_second):
    from instruments.measures import LatencyHistogram
    from loadtests.tally import RunTally
    tally = RunTally()
    tally.posts = [["load-0", i + 1, ts] for i, ts in enumerate(posts)]
    for second, latencies in latencies_by_second.items():
        histogram = LatencyHistogram()
        for value in latencies:
            histogram.record(value)
        tally.seconds[second] = (histogram, LatencyHistogram())
    return tally


def test_a_step_holds_when_every_listener_got_its_burst_within_the_objective():
    from loadtests.shapes import judge_step
    tally = fake_tally([1000.2, 1000.3], {1000: [0.1] * 150, 1001: [0.2] * 50})
    verdict = judge_step(tally, 1, 100, 1, 1000.0, 1002.0, 1010.0, slo=0.5)
    assert verdict["held"] and verdict["expected"] == verdict["delivered"] == 200


def test_a_burst_post_accepted_late_in_the_settling_wait_counts_with_its_step():
    from loadtests.shapes import judge_step
    tally = fake_tally([1000.2, 1004.5, 1011.0], {1000: [0.1] * 100, 1004: [0.2] * 100})
    verdict = judge_step(tally, 1, 100, 1, 1000.0, 1002.0, 1010.0, slo=0.5)
    assert verdict["posts"] == 2 and verdict["expected"] == verdict["delivered"] == 200 and verdict["held"]


@pytest.mark.parametrize("latencies, reason", [
    ({1000: [0.1] * 150}, "incomplete"),            # 50 of 200 deliveries missing
    ({1000: [0.1] * 100, 1001: [0.9] * 100}, "slow"),  # p99 900 ms
])
def test_a_step_breaks_on_a_missing_delivery_or_a_slow_p99(latencies, reason):
    from loadtests.shapes import judge_step
    verdict = judge_step(fake_tally([1000.2, 1000.3], latencies), 2, 100, 1, 1000.0, 1002.0, 1010.0, slo=0.5)
    assert not verdict["held"]


def test_the_stepped_summary_names_the_last_step_that_held_beside_the_one_that_broke(tmp_path):
    from loadtests.shapes import steps_summary
    path = tmp_path / "steps.json"
    held = {"step": 1, "listeners": 2000, "posts": 5, "expected": 10000, "delivered": 10000, "p50_s": 0.05,
            "p99_s": 0.12, "held": True}
    broke = dict(held, step=2, listeners=4000, expected=20000, delivered=19990, p99_s=0.61, held=False)
    path.write_text(json.dumps({"slo_s": 0.5, "step": 2000, "steps": [held, broke]}))
    last, breaking = steps_summary(str(path))
    assert last.startswith("the last step that held: step 1, 2000 listeners")
    assert breaking.startswith("the step that broke: step 2, 4000 listeners")
    assert "19990 of 20000 deliveries" in breaking and "p99 610 ms" in breaking


# -- a capacity the rig could not measure ---------------------------------------------------------

def bracket_ending_on(failing_runs, capacity_at=4374, failed_at=4583):
    """A search result whose bracket is [capacity_at, failed_at), the runs at failed_at as given."""
    result = {"capacity": capacity_at, "bracket": [capacity_at, failed_at], "converged": True, "stopped": "converged",
              "bracket_share": (failed_at - capacity_at) / capacity_at,
              "probes": [{"count": capacity_at, "passed": True, "runs": [dict(PASSING, requested=capacity_at)] * 2},
                         {"count": failed_at, "passed": False,
                          "runs": [dict(run, requested=failed_at) for run in failing_runs]}]}
    result["limited_by"] = capacity.limited_by(result)
    return result


PASSING = {"passed": True, "failures": [], "p50_s": 0.1, "p99_s": 0.3, "last_delivery_s": 0.4,
           "client_lag_p99_s": 0.001, "other_work_cores": 0.1, "machine_busy_cores": 1.2}
LAGGING = dict(PASSING, passed=False, failures=["client lag p99 60.0 ms over 10 % of p99"], client_lag_p99_s=0.06,
               machine_busy_cores=1.5)
SLOW = dict(PASSING, passed=False, failures=["p99 610 ms over 500 ms"], p99_s=0.61, machine_busy_cores=1.4)
SATURATED = dict(SLOW, machine_busy_cores=1.97)


@pytest.mark.parametrize("runs, limit", [
    ([LAGGING, LAGGING], "load generator"), ([LAGGING, SLOW], "load generator"),
    ([SATURATED, SATURATED, SLOW], "machine"), ([SLOW, SLOW], None), ([SATURATED, SLOW, SLOW], None),
])
def test_a_bracket_ending_on_the_rig_or_a_busy_machine_is_a_lower_bound(runs, limit):
    found = capacity.rig_limit(bracket_ending_on(runs), cores=2)
    assert (found and found["limit"]) == limit
    if limit:
        assert found == {"limit": limit, "at": 4583, "cores": 2}


def test_a_hold_that_runs_out_is_the_servers_own_limit_not_the_rigs():
    full = bracket_ending_on([{"passed": False, "failures": ["hold: 19800 of 21000 polls connected"],
                               "hold_resource": "descriptors", "machine_busy_cores": 2.0}] * 2)
    assert full["limited_by"] == "hold (descriptors)" and capacity.rig_limit(full, cores=2) is None


def test_a_lower_bound_is_worded_as_one_in_the_verdict_and_the_table(tmp_path):
    lagging = bracket_ending_on([LAGGING, LAGGING])
    lagging["rig_limit"] = capacity.rig_limit(lagging, cores=2)
    assert capacity.capacity_text(lagging, lagging["rig_limit"]) == (
        "at least 4,374; the load generator was the limit here")
    slow = bracket_ending_on([SLOW, SLOW])
    assert capacity.capacity_text(slow, capacity.rig_limit(slow, cores=2)) == "4,374"
    ceiling = {"first": "descriptors", "polls": 19800,
               "ceilings": {"descriptors": {"polls": 19800, "figure": "open-file limit 20000 per server process x 1"}}}
    entries = [{"label": "Chattle, 4 workers", "workers": 4, "env": None, "search": lagging, "hold_ceiling": ceiling}]
    text = capacity.verdict(entries, 0.5, "")
    assert "holds at least 4,374 long-polls" in text and "the load generator was the limit here" in text
    assert "another host" in text and "fewer workers per core" in text
    assert "4583" not in text and "at 4,583 the rig fell behind" in text
    rows = capacity_rows(tmp_path, entries)
    capacity_row = next(row for row in rows if row[0] == "Chattle, 4 workers: capacity")
    assert capacity_row[1].startswith("at least 4,374; the load generator was the limit here")
    assert capacity_row[2] == "lower bound"


def capacity_rows(tmp_path, entries):
    """The table write_report makes of `entries` (and its chart, drawn for real)."""
    import argparse
    rows = []
    for entry in entries:
        entry.setdefault("at_capacity", None)
        entry.setdefault("hold_checks", [])
        entry.setdefault("hold_observed", None)
    args = argparse.Namespace(repeats=3, needed=2, start=5000, max_polls=200000, max_probes=14, time_limit=60)
    original = capacity.write_html
    capacity.write_html = lambda _path, _title, _caption, table, *_a, **_k: rows.extend(table)
    try:
        capacity.write_report(str(tmp_path), entries, args, 0.5, {"cpu": "test"}, [], 1.0)
    finally:
        capacity.write_html = original
    assert (tmp_path / "capacity.png").exists()
    return rows
