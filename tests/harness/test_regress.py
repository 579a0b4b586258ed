"""`make regress`, both gates, run for real: each must pass what it should and fail
when every poll answer does about 10 % more work.

EXTRA_WORK squares summed per answer (CHATTLE_BENCH_EXTRA_WORK, installed by the
harness's harness/bench_server.py in whichever process serves) cost about 2.3 us here, about
10 % of the time a fan-out spends per waiter: bench/ab.py measured +6 % to +9 % on its
socket fan-out and +11 % to +17 % on the rig. In instructions it is about 9 % more per
poll and a quarter more per answered poll (an answer's time is mostly the kernel's and
the client's, which callgrind does not count).
"""

import json
import os
import platform
import subprocess
import sys

import pytest

import chattle
from bench import ab, regress
from harness import bench_server
from instruments.provenance import without_bench_environment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXTRA_WORK = 80


def run_regress(*args, extra_work=None, timeout=600):
    env = without_bench_environment()
    env.pop("PYTEST_ADDOPTS", None)
    if extra_work:
        env[bench_server.EXTRA_WORK_VARIABLE] = str(extra_work)
    return subprocess.run([sys.executable, "-m", "bench.regress", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# -- the instruction gate --------------------------------------------------------------------

@pytest.fixture(scope="module")
def unchanged(tmp_path_factory, valgrind, cannot_run):
    """One gate run of this tree against the committed baseline, and its figures
    (bench.regress --report-json writes them in the baseline's own format)."""
    report = str(tmp_path_factory.mktemp("regress") / "unchanged.json")
    run = run_regress("--report-json", report)
    if run.returncode == regress.NOT_COMPARABLE:
        cannot_run("the committed baseline is not comparable here:\n" + run.stdout)
    assert os.path.exists(report), run.stdout + run.stderr
    return run, report


@pytest.mark.slow
def test_this_tree_passes_the_instruction_gate(unchanged):
    run, _report = unchanged
    print(run.stdout)
    assert run.returncode == regress.PASSED, run.stdout + run.stderr
    assert "regress: passed" in run.stdout


@pytest.mark.slow
def test_more_work_per_answer_fails_the_instruction_gate(unchanged):
    _run, report = unchanged
    # Against the unchanged tree's own figures, measured here a moment ago: the committed
    # baseline may be older than this tree, this compares like with like.
    slowed = run_regress("--baseline", report, extra_work=EXTRA_WORK)
    print(slowed.stdout)
    assert slowed.returncode == regress.GREW, slowed.stdout + slowed.stderr
    grew = [line for line in slowed.stdout.splitlines() if line.startswith("poll_answered") and "GREW" in line]
    assert grew, "the table must name the figure that grew:\n" + slowed.stdout
    assert "FAILED: poll_answered by +" in slowed.stdout


def test_a_baseline_of_other_versions_is_not_comparable(tmp_path):
    with open(regress.BASELINE) as committed:
        baseline = json.load(committed)
    baseline["versions"]["gevent"] = "0.0.1"
    path = tmp_path / "other.json"
    path.write_text(json.dumps(baseline))
    run = run_regress("--baseline", str(path), timeout=60)
    assert run.returncode == regress.NOT_COMPARABLE, run.stdout + run.stderr
    assert "NOT COMPARABLE" in run.stdout
    assert "gevent" in run.stdout and "0.0.1" in run.stdout and regress.versions()["gevent"] in run.stdout


def test_a_missing_baseline_is_not_a_pass(tmp_path):
    run = run_regress("--baseline", str(tmp_path / "none.json"), timeout=60)
    assert run.returncode == regress.NOT_COMPARABLE, run.stdout + run.stderr
    assert "make regress-accept" in run.stdout


def test_figures_are_differences_of_two_sizes():
    # start-up, park 10 and answer 10, park 30 and answer 30, posts 2 and 6, teardown
    phases = [10**9, 5000 + 10 * 300, 7000 + 10 * 100, 5000 + 30 * 300, 7000 + 30 * 100,
              900 + 2 * 50, 900 + 6 * 50, 10**6]
    assert regress.figures_from(phases, [10, 30], [2, 6]) == {
        "poll_parked": 300, "poll_answered": 100, "poll": 400, "post": 50}


def test_the_committed_baseline_names_its_versions_and_sizes():
    with open(regress.BASELINE) as committed:
        baseline = json.load(committed)
    assert set(regress.COMPARABLE) <= set(baseline["versions"])
    assert baseline["sizes"] == {"fan_outs": list(regress.FAN_OUTS), "posts": list(regress.POSTS)}
    assert set(baseline["figures"]) == {key for key, _what in regress.FIGURES}
    assert baseline["repeat"]["largest_difference_percent"] <= regress.REPEAT_LIMIT_PERCENT


def test_the_baseline_is_keyed_on_python_major_minor_not_its_build():
    # Two builds of one release (pyenv's, Debian's) differ only in sys.version's stamp.
    python = regress.versions()["python"]
    assert python == "%s %d.%d" % (platform.python_implementation(), *sys.version_info[:2])
    assert "(" not in python and "GCC" not in python


# -- the extra work itself ----------------------------------------------------------------------

def test_no_extra_work_is_installed_unless_asked():
    if os.environ.get(bench_server.EXTRA_WORK_VARIABLE):
        pytest.skip("%s is set for this run" % bench_server.EXTRA_WORK_VARIABLE)
    assert chattle.Room.answer.__qualname__ == "Room.answer"
    assert bench_server.install_extra_work({}) is None


def test_extra_work_wraps_the_answer_and_not_the_poll_route():
    # Not the route: a wrapper there stays on every parked poll's stack (memory per held poll
    # 5-6 % larger); Room.answer runs only once a poll is answered.
    class Room(chattle.Room):
        pass

    extra_work = bench_server.install_extra_work({bench_server.EXTRA_WORK_VARIABLE: "3"}, room_class=Room)
    try:
        assert Room.answer is not chattle.Room.answer and extra_work.answer is chattle.Room.answer
        assert Room.answer.__name__ == "answer_with_extra_work"
        assert not any(isinstance(plugin, bench_server.ExtraWorkPerAnswer) for plugin in chattle.app.plugins)
    finally:
        extra_work.remove(Room)
    assert Room.answer is chattle.Room.answer


def test_extra_work_that_is_not_a_number_stops_the_server():
    with pytest.raises(SystemExit, match=bench_server.EXTRA_WORK_VARIABLE):
        bench_server.install_extra_work({bench_server.EXTRA_WORK_VARIABLE: "lots"})


# -- the A/B gate's verdict ---------------------------------------------------------------------
# The gate itself times two trees on the wall clock; that run is a benchmark
# (bench/benchmarks/test_ab_gate.py), not a test of make test. Its verdict is arithmetic.

def ab_pairs(ratio, pairs=5):
    """Pairs of rounds where head takes `ratio` times base's time, with a little spread."""
    spread = (0.99, 1.0, 1.01)
    return [{key: {"base": [100.0 * s for s in spread], "head": [100.0 * ratio * s for s in spread[::-1]]}
             for key, _label in ab.FIGURES} for _pair in range(pairs)]


def test_the_ab_verdict_fails_a_head_slower_beyond_its_gate(capsys):
    assert ab.verdict(ab_pairs(1.15), ab.GATE_PERCENT) == ab.SLOWER
    out = capsys.readouterr().out
    assert "SLOWER" in out and "ab: FAILED: head is slower than base" in out


def test_the_ab_verdict_passes_a_change_inside_its_gate(capsys):
    assert ab.verdict(ab_pairs(1.02), ab.GATE_PERCENT) == ab.PASSED
    assert ab.verdict(ab_pairs(0.8), ab.GATE_PERCENT) == ab.PASSED
    assert "faster" in capsys.readouterr().out
