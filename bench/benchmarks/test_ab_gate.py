"""The A/B gate of `make regress BASE=<rev>`, run for real: this tree against itself with
about 10 % more work per poll answer in head must come out SLOWER.

It times both sides on the wall clock, so it belongs with the benchmarks, run on a quiet
machine (`python -m pytest bench/benchmarks/test_ab_gate.py`), not in `make test`; the
verdict's arithmetic is tested there (tests/harness/test_regress.py).
"""

import os
import shutil
import subprocess
import sys

import pytest

from instruments.provenance import without_bench_environment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXTRA_WORK_VARIABLE = "CHATTLE_BENCH_EXTRA_WORK"
EXTRA_WORK = 80  # squares summed per answer: about 10 % of a fan-out's time per waiter here
PASSED, SLOWER = 0, 1  # bench.ab's exit codes


def test_more_work_per_answer_fails_the_ab_gate():
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("the A/B gate needs a git checkout")
    env = without_bench_environment()
    env.pop("PYTEST_ADDOPTS", None)
    run = subprocess.run([sys.executable, "-m", "bench.regress", "--base", "HEAD",
                          "--head-env", "%s=%d" % (EXTRA_WORK_VARIABLE, EXTRA_WORK)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(run.stdout)
    assert run.returncode == SLOWER, run.stdout + run.stderr
    assert "SLOWER" in run.stdout and "ab: FAILED: head is slower than base" in run.stdout
    assert "chattle-ab-" not in subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True,
                                               text=True).stdout, "the base's worktree was left behind"
