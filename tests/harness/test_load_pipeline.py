"""`make load` end to end, small: a real server, real Locust, the report; then the report's
figures are checked against what the listeners themselves saved in raw/."""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from harness.processes import Process, free_port, get_json, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    report_root = tmp_path_factory.mktemp("load-reports")
    run = subprocess.run(
        [sys.executable, "-m", "loadtests.run", "--users", "50", "--duration", "24", "--spawn-rate", "50",
         "--report-root", str(report_root)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    reports = glob.glob(os.path.join(str(report_root), "*-load"))
    assert len(reports) == 1, run.stdout + run.stderr
    with open(os.path.join(reports[0], "summary.json")) as summary:
        return run, reports[0], json.load(summary)


def raw_run(report_dir):
    with open(os.path.join(report_dir, "raw", "run.json")) as raw:
        return json.load(raw)


# Checks that judge this machine, not the pipeline: on a contended machine the client's
# lag can pass its share of a tiny p99, and other processes can keep every core busy.
MACHINE_DEPENDENT = {"the machine was not saturated", "latency is the server's, not the client's"}


def test_the_small_run_passes_its_checks(small_run):
    run, _report_dir, summary = small_run
    failed = [check for check in summary["checks"] if not check["passed"]]
    assert [check for check in failed if check["check"] not in MACHINE_DEPENDENT] == [], run.stdout
    assert run.returncode == (0 if not failed else 1), run.stdout + run.stderr
    assert "Chattle load run:" in run.stdout
    assert "server wake-up ms" in run.stdout and "client lag ms" in run.stdout


def test_report_figures_match_what_the_listeners_saw(small_run):
    _run, report_dir, summary = small_run
    raw = raw_run(report_dir)
    listeners = raw["listeners"]
    assert len(listeners) == 50 == summary["delivery"]["listeners"]
    assert all(listener["gave_up"] is None for listener in listeners)
    received = sum(listener["ledger"]["received"] for listener in listeners)
    caught_up = sum(listener["caught_up"] for listener in listeners)
    assert received > 0
    assert summary["deliveries"] == received == summary["delivery"]["received"]
    # every message of a held poll has a latency; catch-up messages at ramp-down have none
    assert summary["wakeup_latency_s"]["count"] == received - caught_up == summary["client_lag_s"]["count"]
    assert sum(worker["deliveries"] for worker in raw["workers"].values()) == received - caught_up
    assert summary["delivery"]["lost"] == summary["delivery"]["duplicated"] == 0
    assert summary["delivery"]["out_of_order"] == 0
    # every listener of a room ends at that room's final cursor, which the server reported
    for listener in listeners:
        assert listener["ledger"]["next_expected"] - 1 == summary["final_cursors"][listener["room"]]
    assert summary["posts"] == sum(summary["final_cursors"].values())
    cpu = summary["cpu"]
    assert cpu["server_cpu_s"] > 0 and cpu["client_cpu_s"] > 0
    assert cpu["client_over_server"] == pytest.approx(cpu["client_cpu_s"] / cpu["server_cpu_s"])


def test_report_holds_every_chart_and_locusts_own_output(small_run):
    _run, report_dir, summary = small_run
    for name in ("held_polls.png", "latency_over_time.png", "latency_histogram.png", "memory.png",
                 "throughput.png", "cpu.png"):
        path = os.path.join(report_dir, name)
        assert os.path.getsize(path) > 1000, name
        assert name in summary["charts"]
    for name in ("report.html", "locust.html", "locust_stats.csv", "samples.json"):
        assert os.path.exists(os.path.join(report_dir, name)), name
    with open(os.path.join(report_dir, "report.html")) as page:
        html = page.read()
    assert summary["machine_line"] in html
    assert html.count("<figure>") == len(summary["charts"])


def test_preflight_refuses_a_run_that_cannot_reach_its_target(tmp_path):
    run = subprocess.run([sys.executable, "-m", "loadtests.run", "--users", "50", "--duration", "5",
                          "--report-root", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "preflight refused" in run.stderr and "at least" in run.stderr
    assert os.listdir(str(tmp_path)) == []  # nothing was started, no report written


def orchestrate(argv, tmp_path, timeout):
    return subprocess.run([sys.executable, "-m", "loadtests.run", "--report-root", str(tmp_path), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_a_target_that_does_not_speak_the_protocol_is_refused_in_one_line(tmp_path):
    port = free_port()
    other = Process([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)], cwd=str(tmp_path))
    try:
        wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, 10,
                   "http.server", other)
        run = orchestrate(["--users", "20", "--duration", "30", "--host", "http://127.0.0.1:%d" % port],
                          tmp_path / "reports", 60)
    finally:
        other.stop()
    assert run.returncode == 2, run.stdout + run.stderr
    assert "does not speak the Chattle protocol" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "reports").exists() or os.listdir(str(tmp_path / "reports")) == []


def test_listeners_whose_server_vanishes_count_as_lost_contact_not_lost_messages(tmp_path, start_chattle):
    server = start_chattle()
    argv = [sys.executable, "-m", "loadtests.run", "--report-root", str(tmp_path), "--host", server.url,
            "--users", "30", "--duration", "26", "--spawn-rate", "30", "--lost-contact-seconds", "3"]
    run = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: server_waiters(server) >= 30, 40, "30 held polls")
        server.popen.kill()          # the server vanishes mid-run, holding every listener
        server.popen.wait(10)
        output, _ = run.communicate(timeout=150)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1, output
    with open(glob.glob(os.path.join(str(tmp_path), "*-load", "summary.json"))[0]) as summary_file:
        summary = json.load(summary_file)
    delivery = summary["delivery"]
    assert delivery["gave_up"] == 30 and list(delivery["gave_up_reasons"]) == ["lost contact"], delivery
    assert delivery["lost"] == 0 and delivery["listeners"] == 0
    assert "lost contact" in output


def server_waiters(server):
    status, body = get_json(server.url + "/stats", timeout=2)
    return body["waiters"] if status == 200 else 0


def test_ctrl_c_stops_everything_and_writes_the_partial_report(tmp_path):
    argv = [sys.executable, "-m", "loadtests.run", "--report-root", str(tmp_path), "--users", "30",
            "--duration", "60", "--spawn-rate", "30"]
    run = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = run.stdout.readline()
            lines.append(line)
            if "bursts" in line or not line:
                break
        run.send_signal(signal.SIGINT)
        output, _ = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            run.kill()
    output = "".join(lines) + output
    assert run.returncode == 130, output
    server_pid = int(re.search(r"chattle python chattle.py on \S+ \(pid (\d+)\)", output).group(1))
    assert not os.path.exists("/proc/%d" % server_pid) or open("/proc/%d/stat" % server_pid).read().split()[2] == "Z"
    report = glob.glob(os.path.join(str(tmp_path), "*-load"))[0]
    with open(os.path.join(report, "report.html")) as page:
        assert "interrupted" in page.read()
    with open(os.path.join(report, "summary.json")) as summary_file:
        summary = json.load(summary_file)
    assert summary["run"]["interrupted"] and not summary["passed"]
    assert summary["delivery"]["listeners"] == 30       # every listener caught up and reported on its way out


def test_a_second_sigterm_during_the_clean_up_still_stops_every_process_the_run_started(tmp_path):
    """The first SIGTERM starts the clean-up (listeners asked to stop and catch up); a
    second one, while that goes on, hurries it and must not cut it short: the server,
    Locust's master and its workers are all stopped, and the partial report is written."""
    import psutil
    argv = [sys.executable, "-m", "loadtests.run", "--report-root", str(tmp_path), "--users", "30",
            "--duration", "60", "--spawn-rate", "30"]
    run = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    lines, started = [], []

    def read_until(text):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = run.stdout.readline()
            lines.append(line)
            if text in line or not line:
                return text in line
        return False
    try:
        assert read_until("bursts"), "".join(lines)
        started = psutil.Process(run.pid).children(recursive=True)   # server, Locust master, its worker
        assert len(started) >= 3, started
        run.send_signal(signal.SIGTERM)
        assert read_until("interrupted; stopping"), "".join(lines)
        run.send_signal(signal.SIGTERM)                              # during the clean-up
        output, _ = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            run.kill()
    output = "".join(lines) + output
    left = [process for process in started if _running(process)]
    for process in left:
        process.kill()                                               # ours: never leave them behind
    assert left == [] and run.returncode == 130, output
    assert glob.glob(os.path.join(str(tmp_path), "*-load", "summary.json")), output


def _running(process):
    import psutil
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
