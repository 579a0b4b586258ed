"""instruments/history.py: the line each run appends; loadtests/history.py: `make history`'s steps and charts,
on synthetic data (deterministic, fast)."""

import json
import os
import random
import re

from instruments import history
from loadtests import history as charts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def series(count=20, step_at=None, factor=1.15, noise=0.03, seed=1):
    draw = random.Random(seed)
    return [100 * (1 + draw.gauss(0, noise)) * (factor if step_at is not None and index >= step_at else 1)
            for index in range(count)]


# -- change points ----------------------------------------------------------------------------------

def test_otavas_function_is_the_pinned_one_and_returns_what_history_reads():
    # Otava documents its command line, not compute_change_points: an upgrade that changes its
    # arguments or what it returns fails here, by name, before any chart is drawn wrong.
    from importlib.metadata import version

    from otava.analysis import compute_change_points

    pinned = re.search(r'"apache-otava==([^"]+)"', open(os.path.join(ROOT, "pyproject.toml")).read()).group(1)
    assert version("apache-otava") == pinned
    found, weak = compute_change_points([1.0] * 6 + [2.0] * 6, window_len=charts.WINDOW, max_pvalue=charts.MAX_PVALUE,
                                        min_magnitude=charts.MIN_CHANGE)
    [point] = found
    assert (point.index, point.stats.mean_1, point.stats.mean_2) == (6, 1.0, 2.0) and point.stats.pvalue < 1e-9
    assert weak


def test_a_step_injected_at_a_known_commit_is_marked_at_that_commit():
    [shift] = charts.shifts(series(step_at=10))
    assert shift.index == 10
    assert 0.10 < shift.change < 0.20 and shift.pvalue < charts.MAX_PVALUE


def test_a_step_down_is_found_too():
    [shift] = charts.shifts(series(step_at=6, factor=0.8, seed=2))
    assert shift.index == 6 and shift.after < shift.before


def test_flat_noise_marks_nothing():
    for seed in range(20):
        assert charts.shifts(series(seed=seed)) == [], seed


def test_a_one_commit_blip_is_not_a_change_point():
    values = series(seed=3)
    values[7] *= 1.4
    assert charts.shifts(values) == []


def test_a_significant_step_smaller_than_the_minimum_is_not_marked():
    values = series(step_at=10, factor=1.03, noise=0.002)
    assert charts.shifts(values, min_change=0.0)[0].index == 10       # significant, and smaller than 5 %
    assert charts.shifts(values) == []


def test_two_steps():
    values = series(count=30, noise=0.01, seed=5)
    values = [value * (1.2 if 10 <= index < 20 else 1) for index, value in enumerate(values)]
    assert [shift.index for shift in charts.shifts(values)] == [10, 20]


def test_a_series_too_short_says_so():
    assert charts.shifts(series(count=charts.MIN_COMMITS - 1, step_at=1)) is None
    assert charts.shifts(series(count=charts.MIN_COMMITS)) == []
    rows = charts.shift_rows("p99", "ms", [("a" * 40, [1.0], [], [])] * 3, [(0, 1.0), (1, 1.0), (2, 1.0)], None)
    assert rows[0][1].startswith("too short: 3 commit(s)")


# -- the line ------------------------------------------------------------------------------------------

def load_summary():
    return {"run": {"users": 100, "posters": 1, "rooms": 1, "duration": 24.0, "burst_size": 5, "burst_gap": 8.0,
                    "schedule_seed": 1, "poll_timeout": 20.0, "spawn_rate": 500.0, "stop_rate": 2500.0, "workers": 1,
                    "host": None},
            "cpu": {"server_us_per_delivery": 61.0}, "wakeup_latency_s": {"p50": 0.05, "p99": 0.12},
            "memory": {"bytes_per_held_poll": 7168.0}, "delivery": {"lost": 1, "duplicated": 0, "out_of_order": 2},
            "held_polls_peak": 100, "deliveries": 5000, "passed": True, "machine_check": {"machine_bound": False}}


def test_a_load_run_appends_one_line_with_commit_machine_settings_and_figures(tmp_path):
    entry = history.record_load(load_summary(), str(tmp_path), report_dir="somewhere")
    [line] = (tmp_path / "history.jsonl").read_text().splitlines()
    assert json.loads(line) == json.loads(json.dumps(entry))
    assert entry["kind"] == "load" and entry["report"] == "somewhere"
    assert len(entry["commit"]) == 40 and isinstance(entry["dirty"], bool)
    machine = entry["machine"]
    assert machine["cores"] == os.cpu_count() and machine["kernel"] == os.uname().release
    assert machine["cpu_model"] and machine["python"] and "gevent" in machine["libraries"]
    assert entry["settings"]["users"] == 100 and entry["settings"]["host"] is None
    assert entry["figures"] == {"server_us_per_delivery": 61.0, "wakeup_p50_ms": 50.0, "wakeup_p99_ms": 120.0,
                                "kib_per_held_poll": 7.0, "messages_wrong": 3, "held_polls_peak": 100,
                                "deliveries": 5000}
    history.record_load(load_summary(), str(tmp_path))
    entries, bad = charts.read(str(tmp_path / "history.jsonl"))
    assert len(entries) == 2 and bad == 0
    assert entries[0]["settings_id"] == entries[1]["settings_id"]


def test_other_tools_append_through_the_same_function(tmp_path):
    path = str(tmp_path / "history.jsonl")
    history.append("capacity", {"workers": 1, "p99_target_ms": 200}, {"capacity_polls": 15000}, path=path)
    [entry], _bad = charts.read(path)
    assert entry["kind"] == "capacity" and entry["figures"] == {"capacity_polls": 15000}


def test_the_bench_environment_is_part_of_the_settings():
    assert history.load_settings({}, environ={"CHATTLE_BENCH_EXTRA_WORK": "600", "HOME": "/x"})[
        "bench_environment"] == {"CHATTLE_BENCH_EXTRA_WORK": "600"}


def test_lines_that_are_not_records_are_counted_and_skipped(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text('{"figures": {"a": 1}}\nnot json\n[1, 2]\n\n')
    entries, bad = charts.read(str(path))
    assert len(entries) == 1 and bad == 2


def test_an_unwritable_history_does_not_fail_the_run(tmp_path, capsys):
    (tmp_path / "history.jsonl").mkdir()
    history.record_load(load_summary(), str(tmp_path))
    assert "could not append" in capsys.readouterr().err


# -- make history ------------------------------------------------------------------------------------

def commit_of(index):
    return ("%02x" % (index + 1)) * 20


def write_history(path, values):
    """Two runs per commit of `values` (server CPU per delivery; p99 flat), and one run of another machine."""
    machine = history.machine_fingerprint()
    with open(path, "w") as out:
        for index, value in enumerate(values):
            for repeat in range(2):
                out.write(json.dumps({"kind": "load", "time": "2026-01-01T00:%02d:%02d" % (index, repeat),
                                      "commit": commit_of(index), "commit_time": 1000 + index,
                                      "dirty": False, "machine": machine, "machine_id": machine["id"],
                                      "settings": {"users": 5000}, "settings_id": "s1",
                                      "figures": {"server_us_per_delivery": value, "wakeup_p99_ms": 100.0}}) + "\n")
        out.write(json.dumps({"kind": "load", "time": "2026-01-02", "commit": "f" * 40, "machine_id": "elsewhere",
                              "machine": {}, "settings": {"users": 5000}, "settings_id": "s1",
                              "figures": {"server_us_per_delivery": 1.0}}) + "\n")


def test_make_history_marks_a_step_injected_at_a_commit_on_the_chart_and_in_the_table(tmp_path, capsys):
    path = str(tmp_path / "history.jsonl")
    write_history(path, series(count=8, step_at=4, noise=0.01))
    out_dir = str(tmp_path / "charts")
    assert charts.main(["--history", path, "--out", out_dir]) == 0
    assert sorted(os.listdir(os.path.join(out_dir, "group-1"))) == ["server_us_per_delivery.png",
                                                                    "wakeup_p99_ms.png"]
    page = open(os.path.join(out_dir, "index.html")).read()
    assert "8 run(s) over" not in page and "16 run(s) over 8 commit(s)" in page
    assert "%s: +" % commit_of(4)[:10] in page          # the chart's caption names the fifth commit
    assert "wake-up latency p99 by commit" in page
    [cpu_row] = [line.split() for line in capsys.readouterr().out.splitlines() if "CPU" in line and "%" in line]
    commit, change = cpu_row[4], float(cpu_row[9].rstrip("%"))
    assert commit == commit_of(4)[:10] and 10 < change < 20
    assert page.count("<td>%s</td>" % commit_of(4)[:10]) == 1     # the table's one change point
    assert "no change point over 8 commit(s)" in page              # p99 is flat


def test_make_history_marks_nothing_on_flat_noise(tmp_path, capsys):
    path = str(tmp_path / "history.jsonl")
    write_history(path, series(count=12, noise=0.03, seed=7))
    assert charts.main(["--history", path, "--out", str(tmp_path / "charts")]) == 0
    out = capsys.readouterr().out
    assert out.count("no change point over 12 commit(s)") == 2            # both figures, and no row with a change
    assert not [line for line in out.splitlines() if line.rstrip().endswith(tuple("0123456789"))]


def test_make_history_says_when_a_history_is_too_short(tmp_path, capsys):
    path = str(tmp_path / "history.jsonl")
    write_history(path, [100.0, 130.0, 131.0])
    assert charts.main(["--history", path, "--out", str(tmp_path / "charts")]) == 0
    assert capsys.readouterr().out.count("too short: 3 commit(s)") == 2


def test_make_history_without_runs_says_how_to_make_some(tmp_path, capsys):
    assert charts.main(["--history", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    assert "make load" in capsys.readouterr().err


def test_runs_that_were_not_valid_are_kept_apart_in_the_series():
    def entry(commit, value, **more):
        return dict({"commit": commit, "time": "t", "commit_time": 1, "figures": {"f": value}}, **more)
    series = charts.by_commit([entry("a", 1.0), entry("a", 2.0, passed=False), entry("a", 3.0, machine_bound=True),
                                entry("a", 4.0, dirty=True, passed=False)], "f")
    assert series == [("a", [1.0, 2.0, 3.0], [4.0], [2.0, 3.0])]
