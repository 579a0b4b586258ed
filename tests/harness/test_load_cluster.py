"""Beyond one machine: clock offsets, load workers on other hosts, several servers.

The parts (offset arithmetic, the tally's bound, a worker that goes silent, a master
that never answers, a host that does not answer /health) run in seconds on loopback;
the whole topology runs in network namespaces (marked slow)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import IN_CI, ROOT
from harness.processes import free_port, get_json, wait_until
from instruments import clocks
from loadtests.report import client_bound_reason, load_host_causes, worker_shares
from loadtests.tally import RunTally, WorkerTally


def test_the_offset_comes_from_the_tightest_round_trip():
    # (sent, server time, received) on a client clock 2 s ahead; the slow trips are skewed
    samples = [(100.000, 98.030, 100.080), (101.000, 99.0003, 101.001), (102.000, 100.010, 102.040)]
    offset, bound = clocks.tightest(samples)
    assert bound == pytest.approx(0.0005) and offset == pytest.approx(2.0002, abs=1e-9)


def test_the_kernel_stamps_and_this_process_share_a_clock_on_a_real_host():
    skew, bound = clocks.kernel_stamp_skew()
    assert bound is not None and abs(skew) <= bound + 0.001


def test_a_latency_under_the_bound_is_counted_and_never_negative():
    tally = WorkerTally()
    # arrival on a clock 2 s ahead; offset 2 s +- 1 ms; the first would be -0.5 ms uncorrected by the bound
    tally.delivery(1002.0005, 1002.0006, 1000.001, offset=2.0, bound=0.001)
    tally.delivery(1002.0100, 1002.0101, 1000.000, offset=2.0, bound=0.001)
    report = tally.take_report(final=True)
    run = RunTally()
    run.merge("w1", report)
    summary = run.latency.summary()
    assert report["under_bound"] == 1 and summary["count"] == 2
    assert summary["p50"] == pytest.approx(0.001, rel=0.01) and summary["max"] == pytest.approx(0.010, rel=0.01)
    assert report["seconds"][0][0] == 1000  # filed under the second on the server's clock


def faked_wait_early(faketime_env):
    """monotonic_wait_early() in a process whose wall clock faketime puts 2 s ahead."""
    probe = subprocess.run(["faketime", "-m", "-f", "+2s", sys.executable, "-c",
                            "from instruments.clocks import monotonic_wait_early; print(monotonic_wait_early())"],
                           cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, **faketime_env), capture_output=True,
                           text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    return float(probe.stdout)


def test_the_load_hosts_faketime_settings_keep_the_gil_hand_offs_timed_wait():
    """libfaketime 0.9.10 (Debian's): its "monotonic fix", on by default with this glibc,
    makes a timed wait on a monotonic condition (CPython's GIL hand-off) return at once;
    the demo's load hosts turn it off. Both halves pin that behaviour: an upgrade that
    changes either shows here."""
    from loadtests.cluster_demo import FAKETIME_ENV
    if shutil.which("faketime") is None:
        if IN_CI:
            pytest.fail("CI=true and faketime is not installed", pytrace=False)
        pytest.skip("faketime is not installed (python3 -m harness.system_packages faketime)")
    assert faked_wait_early(FAKETIME_ENV) == 0.0
    early = faked_wait_early(dict(FAKETIME_ENV, FAKETIME_FORCE_MONOTONIC_FIX="1"))
    assert early > 0.0, "libfaketime's monotonic fix no longer cuts waits short: is the setting still needed?"


def test_the_report_names_the_load_worker_whose_waits_end_early_and_each_workers_lag():
    run = RunTally()
    for host, pid, early, lag in (("host-c", 11, 0.02, 0.090), ("host-d", 12, 0.0, 0.004)):
        tally = WorkerTally()
        tally.clocks = {"timed_wait_early": early, "servers": [],
                        "preload": {"library": "/usr/$LIB/faketime/libfaketimeMT.so.1", "spec": "+2s",
                                    "dont_fake_monotonic": True, "force_monotonic_fix": None}}
        tally.delivery(1000.010 + lag, 1000.010 + lag + lag, 1000.000)
        report = tally.take_report(final=True)
        report.update(host=host, pid=pid)
        run.merge(host, report)
    run.to_dict()
    shares = worker_shares(run)
    assert shares["host-c"]["lag"]["p99"] == pytest.approx(0.090, rel=0.01)
    assert shares["host-d"]["lag"]["p99"] == pytest.approx(0.004, rel=0.01)
    causes = load_host_causes(shares)
    assert len(causes) == 1 and causes[0].startswith("host-c/11: its timed waits return 20.0 ms before their deadline")
    assert "monotonic fix left to its default" in causes[0] and "FAKETIME_FORCE_MONOTONIC_FIX=0" in causes[0]
    reason = client_bound_reason({"p99": 0.100}, {"p99": 0.090}, shares)
    assert "by load worker: host-c/11 90.0 ms, host-d/12 4.0 ms" in reason and "host-c/11: its timed waits" in reason
    assert client_bound_reason({"p99": 0.100}, {"p99": 0.005}, shares) is None


def worker_report(tally, **changes):
    report = tally.take_report()
    report.update(changes)
    return report


def test_a_worker_that_goes_silent_has_its_listeners_lost_contact_and_nobody_waits_on_it():
    run = RunTally("2.47.0")
    alive, dying = WorkerTally(), WorkerTally()
    for tally in (alive, dying):
        for _ in range(3):
            tally.listener_started()
    run.merge("alive", worker_report(alive, locust_version="2.47.0"))
    run.merge("dying", worker_report(dying, locust_version="2.47.0"))
    for _ in range(3):
        alive.listener_ended({"listener": "x", "room": "load-0", "ledger": None, "polls": 0, "caught_up": 0,
                              "listened_until": None, "gave_up": None})
    run.merge("alive", worker_report(alive, locust_version="2.47.0"))
    assert not run.drained({"alive", "dying"})
    assert run.drained({"alive"})  # the master no longer hears "dying"
    shares = worker_shares(run)
    assert shares["dying"]["lost"] and shares["dying"]["lost_contact"] == 3
    assert not shares["alive"]["lost"] and shares["alive"]["listener_share"] == 0.5
    assert run.version_problem is None


def test_a_worker_on_another_locust_version_is_a_clear_error():
    run = RunTally("2.47.0")
    run.merge("old", worker_report(WorkerTally(), locust_version="2.31.0"))
    assert "runs Locust 2.31.0, the master runs 2.47.0" in run.version_problem


def test_a_load_worker_without_a_master_says_so_in_one_line_and_exits_2():
    port = free_port()
    run = subprocess.run([sys.executable, "-m", "loadtests.worker", "--master", "127.0.0.1", "--master-port",
                          str(port), "--master-wait", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "no Locust master answered on 127.0.0.1:%d" % port in run.stderr


def test_a_host_that_does_not_answer_health_is_named_before_anything_starts(start_chattle, tmp_path):
    server = start_chattle()
    dead = "http://127.0.0.1:%d" % free_port()
    run = subprocess.run([sys.executable, "-m", "loadtests.run", "--host", "%s,%s" % (server.url, dead),
                          "--users", "20", "--duration", "30", "--report-root", str(tmp_path / "reports")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "%s does not speak the Chattle protocol" % dead in run.stderr
    assert run.stderr.count("does not speak") == 1, run.stderr
    assert not os.path.exists(tmp_path / "reports")


# -- the whole topology, in network namespaces ----------------------------------------------------

CLUSTER_SECONDS = 150   # deadline of the whole topology run (it takes about 60 s)


@pytest.mark.slow
def test_a_run_across_namespace_hosts_corrects_a_clock_two_seconds_ahead(tmp_path):
    from loadtests.cluster_demo import namespaces_unavailable
    problem = namespaces_unavailable()
    if problem:
        if IN_CI:
            pytest.fail("CI=true and " + problem, pytrace=False)
        pytest.skip(problem)
    cluster = subprocess.Popen([sys.executable, "-m", "loadtests.cluster_demo", "--users", "300", "--duration", "30",
                                "--report-root", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = cluster.communicate(timeout=CLUSTER_SECONDS)
    except subprocess.TimeoutExpired:
        cluster.send_signal(signal.SIGTERM)  # it tears its namespaces down on the way out
        output, _ = cluster.communicate(timeout=60)
        pytest.fail("the cluster run took over %ds:\n%s" % (CLUSTER_SECONDS, output[-3000:]))
    tag = "ch%d-" % (cluster.pid % 100000)
    assert tag not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout, \
        "namespaces left behind"
    report_dir = next(line.split("load: report in ", 1)[1].strip() for line in output.splitlines()
                      if line.startswith("load: report in "))
    with open(os.path.join(report_dir, "summary.json")) as raw:
        summary = json.load(raw)

    offsets = {}
    for clock in summary["clocks"]:
        offsets.setdefault(clock["host"], []).append(clock)
    assert sorted(offsets) == ["host-c", "host-d"] and all(len(per) == 2 for per in offsets.values()), output
    for host, expected in (("host-c", 2.0), ("host-d", 0.0)):
        for clock in offsets[host]:
            # the true offset lies within the measured bound (half the tightest round trip),
            # however slow this machine made that round trip
            assert abs(clock["offset"] - expected) <= clock["bound"] + 0.001, (host, clock)
    shares = {share["host"]: share for share in summary["worker_shares"].values()}
    skewed, control = shares["host-c"]["latency"]["p50"], shares["host-d"]["latency"]["p50"]
    # Corrected or not, not how close: an uncorrected 2 s skew puts the skewed host's
    # latencies 2 s away from the control's; corrected, they differ by the machine's noise
    # (how much is a benchmark's question, not this test's).
    assert abs(skewed - control) < 1.0, output
    delivery = summary["delivery"]
    assert delivery["lost"] == 0 and delivery["gave_up"] == 0 and delivery["listeners"] == 300, output
    assert all(server["held_polls_peak"] for server in summary["servers"].values()), summary["servers"]
    assert len(summary["servers"]) == 2 and summary["deliveries"] > 0
    # libfaketime's setting reached the load hosts: their GIL hand-offs wait as they should
    assert [share["timed_wait_early"] for share in shares.values()] == [0.0, 0.0], shares
    record_path = next(line.split(" in ", 1)[1].split(" (", 1)[0] for line in output.splitlines()
                       if line.startswith("cluster-demo: the run's record in "))
    with open(record_path) as raw:
        record = json.load(raw)["runs"][0]
    assert record["deliveries"] == summary["deliveries"] and sorted(record["server_cpu_s"]) == ["a", "b", "redis"]


def room_cursor(url):
    status, body = get_json(url + "/rooms/load-0/msgs?limit=1", timeout=2)
    return body["cursor"] if status == 200 else 0


@pytest.mark.slow
def test_a_load_worker_killed_mid_run_leaves_its_listeners_lost_contact_not_lost_messages(tmp_path, start_chattle):
    """A master waiting for two remote workers (on loopback here), one of which is killed
    while it holds its listeners: the report says lost contact, and nothing lost."""
    import psutil
    server = start_chattle()
    port = free_port()
    master = subprocess.Popen([sys.executable, "-m", "loadtests.run", "--host", server.url, "--remote-workers", "2",
                               "--master-port", str(port), "--users", "40", "--duration", "28", "--spawn-rate", "40",
                               "--burst-gap", "1", "--report-root", str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    workers = [subprocess.Popen([sys.executable, "-m", "loadtests.worker", "--master", "127.0.0.1", "--master-port",
                                 str(port), "--processes", "1"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True) for _ in range(2)]
    try:
        doomed = psutil.Process(workers[1].pid)
        # its Locust process and the worker that process forked
        wait_until(lambda: len(doomed.children(recursive=True)) >= 2, 60, "the doomed worker's processes")
        # both connected, ramped, held: in the bursts once the first post is in
        wait_until(lambda: room_cursor(server.url) > 0, 90, "the first post of the bursts")
        for process in [doomed] + doomed.children(recursive=True):
            process.kill()
        output, _ = master.communicate(timeout=150)
    finally:
        for process in [master] + workers:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    assert master.returncode == 1, output
    assert "lost contact (its load worker stopped reporting)" in output, output
    assert "0 lost, 0 duplicated, 0 out of order" in output and "LOST: " in output, output
    # One clock: the stages count from the shape's start, after the master waited for its
    # workers, and every post the posters made falls in the bursts on that clock.
    report = next(line.split("load: report in ", 1)[1].strip() for line in output.splitlines()
                  if line.startswith("load: report in "))
    with open(os.path.join(report, "summary.json")) as summary_file:
        run = json.load(summary_file)["run"]
    status, body = get_json(server.url + "/rooms/load-0/msgs?since=0&limit=1000", timeout=5)
    bursts = next(stage for stage in run["stages"] if stage["name"] == "bursts")
    assert run["shape_started"] > run["locust_started"]
    assert status == 200 and body["messages"], body
    assert all(message["ts"] - run["shape_started"] >= bursts["start"] for message in body["messages"])


def test_the_network_softirqs_are_read_per_cpu():
    from instruments.measures import softirq_counts
    text = ("                    CPU0       CPU1       \n          HI:          0          0\n"
            "      NET_TX:         84         55\n      NET_RX:   14310194   13088718\n       BLOCK:      1   2\n")
    assert softirq_counts(text) == {"NET_TX": [84, 55], "NET_RX": [14310194, 13088718]}


def demo_summary():
    shares = {"host-c_1": {"host": "host-c", "pid": 11, "cpu_seconds": 0.5, "timed_wait_early": 0.02,
                           "latency": {"count": 4450, "p50": 0.003, "p99": 0.014},
                           "lag": {"count": 4450, "p50": 0.002, "p99": 0.190}},
              "host-d_2": {"host": "host-d", "pid": 12, "cpu_seconds": 0.5, "timed_wait_early": 0.0,
                           "latency": {"count": 4450, "p50": 0.003, "p99": 0.015},
                           "lag": {"count": 4450, "p50": 0.002, "p99": 0.006}}}
    return {"run": {"started": 1796697339.0}, "machine_line": "2 cores", "other_processes_cpu_mean": 99.0,
            "passed": False, "client_bound": "client lag p99 190.0 ms is over ...", "posts": 89, "deliveries": 8900,
            "delivery": {"lost": 0}, "wakeup_latency_s": {"p50": 0.003, "p99": 0.0145},
            "client_lag_s": {"p50": 0.002, "p99": 0.19}, "cpu": {"client_cpu_s": 1.8}, "worker_shares": shares,
            "clocks": [{"host": "host-c", "pid": 11, "server": "http://10.0.0.2:8080", "offset": 2.0001,
                        "bound": 0.0002}]}


def test_the_demos_record_names_each_load_workers_lag_the_servers_cpu_and_the_softirqs():
    from loadtests.cluster_demo import demo_record, harness_lines
    from results.clocks import section
    figures = {"server_cpu_s": {"a": 3.25, "b": 1.5, "redis": 0.4}, "softirqs": {"NET_RX": [120, 80], "NET_TX": [0, 1]}}
    record = demo_record(demo_summary(), figures, 1500, 45, "default", "0123456789abcdef")
    assert record["command"] == ("make cluster-demo USERS=1500 DURATION=45 "
                                 "(python -m loadtests.cluster_demo --monotonic-fix default)")
    assert [worker["lag_s"]["p99"] for worker in record["workers"]] == [0.190, 0.006]
    lines = harness_lines(record)
    assert lines[0] == ("load worker on host-c: client lag p50 2.0 ms, p99 190.0 ms; 0.5 s CPU; "
                        "its timed waits return 20.0 ms early (libfaketime's monotonic fix)")
    assert lines[1] == "load worker on host-d: client lag p50 2.0 ms, p99 6.0 ms; 0.5 s CPU"
    assert lines[2] == ("CPU during the load: servers a 3.2 s, b 1.5 s, redis 0.4 s; load generator (Locust master and "
                        "workers, orchestrator) 1.8 s")
    assert lines[3].endswith("NET_RX CPU0 120 / CPU1 80; NET_TX CPU0 0 / CPU1 1")
    table_row = next(line for line in section({"runs": [record]}) if line.startswith("| libfaketime's default"))
    assert table_row == ("| libfaketime's default (on with this glibc) | 3.0 / 14.5 | 2.0 / 190.0 | host-c 190.0 ms, "
                         "host-d 6.0 ms | 1.8 s | 3.2 / 1.5 / 0.4 s | 120 / 80 | 0 |")


def test_the_clocks_across_hosts_entry_is_what_its_run_json_makes():
    """docs/results.md's entry is made from the runs' own records: a figure edited by hand, or
    a new run whose record was not kept, parts them."""
    from results.clocks import section
    with open(os.path.join(ROOT, "docs", "runs", "cluster-demo.json")) as kept:
        made = "\n".join(section(json.load(kept)))
    with open(os.path.join(ROOT, "docs", "results.md")) as page:
        results = page.read()
    block = ("<!-- made by: python -m results.clocks docs/runs/cluster-demo.json -->\n" + made
             + "\n<!-- end -->")
    assert block in results, ("docs/results.md's Clocks across hosts entry is not what `python -m "
                              "results.clocks docs/runs/cluster-demo.json` prints: paste its output there")
