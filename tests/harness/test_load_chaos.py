"""`make load CHAOS=...` end to end: real servers, a real redis-server, real Locust, the fault
injected by the harness mid-burst, every listener's receipts judged (loadtests/faults.py).

worker-kill loses nothing (make test); a Redis restart without persistence is judged so
that every post owed is delivered, signalled or lost silently, and the loss today's server
makes is found (long); the matrix writes one table and fails on a failing row (long)."""

import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
RUN_SECONDS = 240   # a deadline for one short fault's run, not a speed claim


def need_redis(cannot_run):
    from harness import system_packages
    if not system_packages.find("redis-server"):
        cannot_run(system_packages.missing_line(["redis-server"]))


def load(tmp_path, *argv, timeout=RUN_SECONDS):
    done = subprocess.run([sys.executable, "-m", "loadtests.run", "--report-root", str(tmp_path), *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return done


def summary_of(tmp_path, done):
    reports = glob.glob(os.path.join(str(tmp_path), "*-load", "summary.json"))
    assert len(reports) == 1, done.stdout[-3000:] + done.stderr[-3000:]
    with open(reports[0]) as written:
        return json.load(written)


SMALL = ["--workers", "2", "--users", "100", "--rooms", "2", "--posters", "1", "--burst-gap", "1",
         "--spawn-rate", "200"]


def test_a_killed_worker_loses_nothing_silently(tmp_path, cannot_run):
    need_redis(cannot_run)
    done = load(tmp_path, "--chaos", "worker-kill", "--duration", "28", *SMALL)
    summary = summary_of(tmp_path, done)
    row = summary["chaos"]
    record = row["record"]
    assert record["error"] is None and record["killed_pid"] and record["workers_back_at"], record
    assert row["listeners"] == 100 and row["owed"] > 0, row
    assert row["lost_silently"] == 0 and row["duplicated"] == 0, row["per_listener"][:5]
    assert row["delivered"] + row["signalled"] == row["owed"]
    assert row["time_without_service_s"] is not None and row["passed"], row["verdict"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "CHAOS=worker-kill" in done.stdout and "worker-kill" in done.stdout


@pytest.mark.long
def test_a_redis_restart_without_persistence_is_judged_post_by_post(tmp_path, cannot_run):
    """A few hundred listeners on two rooms; Redis killed and started empty mid-burst. Every
    owed post is delivered, signalled or lost silently. Where the server gives no epoch and
    does not tell a held poll, the posts of the new history up to its old cursor are lost
    silently (today's server); where it tells (reset), they are signalled. Either way the
    run's exit status follows the row."""
    need_redis(cannot_run)
    done = load(tmp_path, "--chaos", "redis-restart", "--duration", "36", *SMALL[:2], "--users", "200",
                *SMALL[4:])
    summary = summary_of(tmp_path, done)
    row = summary["chaos"]
    assert row["record"]["error"] is None and row["record"]["redis_new_pid"], row["record"]
    assert row["delivered"] + row["signalled"] + row["lost_silently"] == row["owed"], row
    assert row["lost_silently"] + row["signalled"] > 0, "the restart went unnoticed by every listener: %s" % row
    for listener in row["per_listener"]:
        # a silent loss is of a later history than the one the listener began in
        assert all(key != "#0" for key, _id in listener["lost_posts"]), listener
    assert (done.returncode == 0) == row["passed"], done.stdout[-3000:]
    assert (row["lost_silently"] > 0) == ("lost silently" in row["verdict"])


@pytest.mark.long
def test_the_matrix_writes_one_table_and_fails_when_a_row_fails(tmp_path):
    """Two faults on python chattle.py, each its own run: one table in text, HTML and JSON."""
    done = load(tmp_path, "--chaos", "vanished-clients,slow-readers", "--workers", "1", "--users", "100",
                "--rooms", "2", "--burst-gap", "1", "--spawn-rate", "200", "--duration", "36",
                timeout=2 * RUN_SECONDS)
    reports = glob.glob(os.path.join(str(tmp_path), "*-chaos"))
    assert len(reports) == 1, done.stdout[-3000:] + done.stderr[-3000:]
    with open(os.path.join(reports[0], "chaos.json")) as written:
        matrix = json.load(written)
    assert [row["fault"] for row in matrix["rows"]] == ["vanished-clients", "slow-readers"]
    vanished, slow = matrix["rows"]
    # one listener in 5 of 100, less any that was between two polls at that moment
    assert 10 <= vanished["record"]["vanished"] <= 20, vanished["record"]
    assert vanished["vanished_listeners"] == vanished["record"]["vanished"], vanished["record"]
    assert slow["record"]["slow_readers"] == 50 and slow["record"]["rss_growth"] is not None, slow["record"]
    with open(os.path.join(reports[0], "summary.txt")) as text:
        table = text.read()
    assert table.splitlines()[0].split()[:6] == ["fault", "lost", "signalled", "duplicated", "refused", "no"]
    with open(os.path.join(reports[0], "index.html")) as page:
        assert page.read().count("<tr") == 3
    assert (done.returncode == 0) == all(row["passed"] for row in matrix["rows"]), done.stdout[-3000:]
