"""docs/results.md's generated blocks: the convention's reader and writer (results/make.py),
make test's timing read from pytest's own summary (harness/ci_timing.py), and what a run's
provenance records (instruments/provenance.py)."""

import json
import os
import subprocess
import sys

from harness import ci_timing
from instruments.provenance import command_line, provenance
from results import load as load_results
from results import make

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTEST_LOG = """tests/harness/test_x.py ....                                      [100%]
============================= slowest 3 durations ==============================
82.05s call     tests/harness/test_soak.py::test_a_leak_fails[requests, sockets]
39.50s call     tests/harness/test_cluster_demo.py::test_skewed_clock
0.51s setup    tests/server/test_page.py::test_page
=========== 534 passed, 3 skipped, 12 deselected in 594.12s (0:09:54) ===========
"""
TIMING = {"counts": {"passed": 3}, "seconds": 61.0, "slowest": [],
          "provenance": {"command": ".ci/run", "date": "2026-12-08 03:00 UTC", "commit": "0" * 40, "dirty": False,
                         "machine": "a machine", "load_average": 0.5}}


def page_with_block(root, body):
    os.makedirs(os.path.join(root, "docs", "runs"))
    with open(os.path.join(root, "docs", "runs", "make-test.json"), "w") as out:
        json.dump(TIMING, out)
    page = os.path.join(root, "docs", "results.md")
    with open(page, "w") as out:
        out.write("# Results\n\n## make test\n\n"
                  "<!-- made by: python -m results.make_test docs/runs/make-test.json -->\n"
                  + body + "<!-- end -->\n\nProse after.\n")
    return page


def test_a_block_is_rewritten_to_what_its_command_prints_and_the_rest_is_kept(tmp_path):
    page = page_with_block(str(tmp_path), "| edited by hand | 1 min |\n")
    with open(page) as source:
        text = source.read()
    made = make.regenerate(text, root=str(tmp_path))
    assert "edited by hand" not in made and "3 passed; **1 min 1 s**." in made
    assert made.startswith("# Results\n\n## make test\n\n<!-- made by:")
    assert made.endswith("<!-- end -->\n\nProse after.\n")
    assert make.regenerate(made, root=str(tmp_path)) == made
    assert make.blocks(made)[0][:2] == ("results.make_test", ["docs/runs/make-test.json"])


def test_a_block_whose_run_is_not_kept_yet_is_empty_until_it_is(tmp_path):
    page = page_with_block(str(tmp_path), "3 passed\n")
    os.remove(os.path.join(str(tmp_path), "docs", "runs", "make-test.json"))
    with open(page) as source:
        made = make.regenerate(source.read(), root=str(tmp_path))
    assert "-->\n<!-- end -->" in made and "3 passed" not in made


def test_a_kept_run_no_block_renders_is_named(tmp_path):
    page = page_with_block(str(tmp_path), "")
    with open(os.path.join(str(tmp_path), "docs", "runs", "orphan.json"), "w") as out:
        out.write("{}")
    with open(page) as source:
        assert make.unrendered_runs(source.read(), root=str(tmp_path)) == ["docs/runs/orphan.json"]


def test_make_results_check_fails_on_a_stale_block_and_names_it(tmp_path):
    page = page_with_block(str(tmp_path), "stale\n")
    run = subprocess.run([sys.executable, "-m", "results.make", "--check", "--page", page], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "results.make_test" in run.stderr, run.stderr


def test_make_tests_timing_is_pytests_own_summary():
    timing = ci_timing.timing(PYTEST_LOG)
    assert timing["counts"] == {"passed": 534, "skipped": 3, "deselected": 12}
    assert timing["seconds"] == 594.12
    assert [entry["seconds"] for entry in timing["slowest"]] == [82.05, 39.5, 0.51]
    assert timing["slowest"][0]["test"] == "tests/harness/test_soak.py::test_a_leak_fails[requests, sockets]"
    assert ci_timing.timing("...\n7 passed, 1 failed in 0.48s\n")["counts"] == {"passed": 7, "failed": 1}


def test_a_load_runs_command_is_named_as_make_load_with_its_variables():
    assert load_results.make_command("python -m loadtests.run --workers 1") == "make load"
    assert load_results.make_command("python -m loadtests.run --users 5000 --burst-gap 6") == \
        "make load USERS=5000 BURST_GAP=6"


def test_provenance_names_the_command_the_commit_and_the_machine():
    assert command_line([os.path.join(ROOT, "bench", "sweep.py"), "--quick"]) == "python -m bench.sweep --quick"
    recorded = provenance(command="make bench", started=0)
    assert recorded["command"] == "make bench" and recorded["date"] == "1970-01-01 00:00 UTC"
    assert len(recorded["commit"]) == 40 and "cores" in recorded["machine"]


def test_asking_the_machine_imports_no_package_it_names():
    """provenance() runs at the start of every load run, in the orchestrator: importing locust
    there to read its version monkey-patched the orchestrator, and its waits at the end of a
    run then hung until their timeouts."""
    probe = ("import sys; from instruments.provenance import provenance; provenance(); "
             "print(sorted(name for name in ('locust', 'gunicorn', 'gevent.monkey') if name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
