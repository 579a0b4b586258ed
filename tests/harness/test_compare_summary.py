"""`make load BASE= SUMMARY=<file>` (loadtests/compare_summary.py): the verdict as Markdown for a CI job's
summary, from a real compare report of synthetic rounds, and from a comparison refused before any round."""

import json
import os

from loadtests import compare, compare_summary
from test_compare import SMALL, needs_git, noisy_rounds, run_load  # noqa: F401 (needs_git: a fixture)

CONTEXT = {"base_revision": "HEAD~1", "base_commit": "b" * 40, "head_commit": "a" * 40, "head_dirty": False,
           "head_env": {}, "settings": {"users": 100}, "settings_line": "users=100", "load_argv": [],
           "machine": {"id": "m"}}


def report(tmp_path, factor, **more):
    rounds = noisy_rounds(3, factor=factor)
    for number, pair in enumerate(rounds, 1):
        for side in ("base", "head"):
            pair[side]["_report_dir"] = str(tmp_path / "rounds" / ("%d-%s" % (number, side)))
    result = dict(compare.judge(rounds), **more)
    report_dir = str(tmp_path / "2026-01-01-000000-compare")
    os.makedirs(report_dir)
    compare.write_report(report_dir, result, rounds, dict(CONTEXT, **more))
    return report_dir


def test_a_worse_verdict_is_summarised_with_its_reasons_and_a_line_per_figure(tmp_path):
    report_dir = report(tmp_path, factor=1.3)
    out = tmp_path / "summary.md"
    out.write_text("an earlier step's summary\n")
    compare_summary.append(str(out), compare_summary.report_since(str(tmp_path), 0), 1)
    text = out.read_text()
    assert text.startswith("an earlier step's summary\n")             # appended, as a job summary collects
    assert "❌ Load against base HEAD~1: **WORSE** (exit 1)" in text
    for label in ("server CPU per delivery", "wake-up latency p50", "wake-up latency p99", "memory per held poll"):
        [line] = [line for line in text.splitlines() if line.startswith("| %s |" % label)]
        assert line.endswith("| worse |")
        assert "- %s +" % label in text                            # its reason, listed above the table
    assert os.path.join(report_dir, "report.html") in text


def test_every_text_field_of_the_verdict_is_quoted_so_the_error_rates_reach_the_summary(tmp_path):
    quote = "false alarms: 1 of 20 [0.1 %, 25 %]; +10 % caught 9 of 10"
    report_dir = report(tmp_path, factor=1.0, calibration=quote)
    text = compare_summary.markdown(compare_summary_json(report_dir), report_dir)
    assert "✅ Load against base HEAD~1: **UNCHANGED** (exit 0)" in text
    assert "- **calibration**: %s" % quote in text
    assert "users=100" in text and "load argv" not in text


def compare_summary_json(report_dir):
    with open(os.path.join(report_dir, "compare.json")) as source:
        return json.load(source)


def test_a_comparison_refused_before_any_round_says_so_in_the_summary(needs_git, tmp_path):  # noqa: F811
    out = tmp_path / "summary.md"
    run = run_load("--base", "no-such-revision-anywhere", "--allow-dirty", *SMALL,
                   "--report-root", str(tmp_path / "reports"), "--summary", str(out))
    assert run.returncode == compare.CANNOT_COMPARE, run.stdout + run.stderr
    text = out.read_text()
    assert "**could not compare** (exit 2)" in text
    assert "'no-such-revision-anywhere' is not a commit of this repository" in text
