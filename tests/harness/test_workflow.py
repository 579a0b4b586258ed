""".github/workflows/load-regression.yml, the pull request's load check: actionlint (as `make lint` runs it)
passes it and fails a broken copy, and it does what docs/compare.md says: the whole history, make regress,
make load against the merge base, the report uploaded, the verdict in the job's summary, actions pinned."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOW = os.path.join(ROOT, ".github", "workflows", "load-regression.yml")
ACTIONLINT = os.path.join(os.path.dirname(sys.executable), "actionlint")


def actionlint(path):
    """actionlint as the Makefile's lint recipe runs it, from the repository (its config there)."""
    recipe = open(os.path.join(ROOT, "Makefile")).read().split("\nlint:", 1)[1].split("\n\n", 1)[0]
    [line] = [line for line in recipe.splitlines() if "actionlint" in line]
    flags = [word for word in line.split() if word.startswith("-")]
    return subprocess.run([ACTIONLINT, *flags, path], cwd=ROOT, capture_output=True, text=True, timeout=60)


def workflow_text():
    with open(WORKFLOW) as source:
        return source.read()


def test_make_lint_runs_actionlint_on_the_workflows():
    recipe = open(os.path.join(ROOT, "Makefile")).read().split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "actionlint" in recipe and ".github/workflows/*.yml" in recipe


def test_actionlint_passes_the_workflow():
    run = actionlint(WORKFLOW)
    assert run.returncode == 0, run.stdout + run.stderr


def test_actionlint_fails_a_broken_workflow(tmp_path):
    broken = (workflow_text().replace("timeout-minutes: 60", "timeout-minute: 60")
              .replace("steps.base.outputs.commit", "steps.merge_base.outputs.commit"))
    path = tmp_path / "broken.yml"
    path.write_text(broken)
    run = actionlint(str(path))
    assert run.returncode == 1
    assert 'unexpected key "timeout-minute"' in run.stdout
    assert 'property "merge_base" is not defined' in run.stdout


def test_a_self_hosted_runners_label_is_known_to_actionlint(tmp_path):
    # docs/compare.md's variant for a runner of one's own
    own = re.sub(r"runs-on: .*", "runs-on: [self-hosted, linux, x64, chattle-load]", workflow_text())
    path = tmp_path / "own.yml"
    path.write_text(own)
    assert actionlint(str(path)).returncode == 0
    path.write_text(own.replace("chattle-load", "chattle-lod"))
    assert 'label "chattle-lod" is unknown' in actionlint(str(path)).stdout


def test_the_workflow_checks_out_everything_and_compares_against_the_merge_base():
    text = workflow_text()
    assert re.search(r"^  pull_request:", text, re.M)
    assert "fetch-depth: 0" in text
    assert 'git merge-base "$BASE_SHA" HEAD' in text
    assert "make regress" in text
    assert 'make load BASE="$MERGE_BASE" SUMMARY="$GITHUB_STEP_SUMMARY"' in text
    assert "path: reports/*-compare/" in text


def test_every_action_is_pinned_to_a_commit():
    uses = re.findall(r"uses: (\S+)", workflow_text())
    assert {use.split("@")[0] for use in uses} == {"actions/checkout", "actions/setup-python",
                                                    "actions/upload-artifact"}
    for use in uses:
        assert re.fullmatch(r"[\w-]+/[\w-]+@[0-9a-f]{40}", use), use
