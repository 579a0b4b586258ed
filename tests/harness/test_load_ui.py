"""`make load UI=1`: Locust's page, watched in headless Chromium while the run holds polls,
stopped from the page, and the same checks and report as a headless run after it."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import require_program

# A whole watched run with its report takes about 25 s here: past what make test has room for.
pytestmark = pytest.mark.long

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "live_page_driver.py")
LISTENERS = 30
# What every run's report judges, headless or watched (loadtests/report.py)
CHECKS = ["run completed", "every message delivered once, in order", "no listener gave up",
          "messages were posted and delivered", "no request failed", "target of held polls reached",
          "the machine was not saturated", "latency is the server's, not the client's"]
MACHINE_DEPENDENT = {"the machine was not saturated", "latency is the server's, not the client's"}


def test_the_page_shows_live_held_polls_and_its_stop_ends_the_run_with_the_report(tmp_path):
    chromium = require_program("chromium")
    argv = [sys.executable, "-m", "loadtests.run", "--ui", "--users", str(LISTENERS), "--duration", "90",
            "--spawn-rate", "30", "--report-root", str(tmp_path)]
    run = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 60
        url = None
        while url is None and time.monotonic() < deadline:
            line = run.stdout.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"Locust's page on (http://127\.0\.0\.1:\d+/)", line)
            url = found and found.group(1)
        assert url, "".join(lines)
        screenshot = str(tmp_path / "locust-live.png")
        watched = subprocess.run(
            [sys.executable, DRIVER, "--url", url, "--chromium", chromium, "--held", str(LISTENERS),
             "--screenshot", screenshot], capture_output=True, text=True, timeout=150,
            env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests", "server")))
        observed = json.loads(watched.stdout.strip().splitlines()[-1]) if watched.stdout.strip() else {}
        assert "error" not in observed and observed.get("stopped_from_page"), (watched.stdout, watched.stderr)
        assert observed["figures"]["held polls (the servers' /metrics)"] == str(LISTENERS)
        output, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGTERM)  # the run's own session: it stops what it started
            run.communicate(timeout=60)
    output = "".join(lines) + output
    report = glob.glob(os.path.join(str(tmp_path), "*-load"))
    assert len(report) == 1, output
    shutil.copy(screenshot, os.path.join(report[0], "locust-live.png"))  # kept with the run it shows
    with open(os.path.join(report[0], "summary.json")) as summary_file:
        summary = json.load(summary_file)
    assert [check["check"] for check in summary["checks"]] == CHECKS, output
    failed = [check for check in summary["checks"] if not check["passed"] and check["check"] not in MACHINE_DEPENDENT]
    assert not failed and not summary["run"]["interrupted"], output
    assert summary["delivery"]["listeners"] == LISTENERS  # every listener caught up and reported on its way out
    assert "Chattle load run:" in output and os.path.exists(os.path.join(report[0], "report.html"))
