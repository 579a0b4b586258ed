"""/metrics: the figures of /stats in the Prometheus text format, summed over gunicorn's
workers, read through a real Prometheus; a worker restarted keeps its counters in the sums."""

import os
import re
import signal
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

import chattle_metrics
from clients import post, stats, wait_for_waiters_across_workers
from harness.monitor import Prometheus
from harness.processes import get_json, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HELD = 300  # polls the test itself holds open, over both workers
ROOM = "watched"


def scrape(server):
    """{sample name with its labels: value} of one GET /metrics."""
    import urllib.request
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join("%s=%s" % item for item in sorted(sample.labels.items()))
            samples[sample.name + ("{%s}" % labels if labels else "")] = sample.value
    return samples


def until_scraped(server, wanted, what):
    """Scrape until every sample of `wanted` has its value (siblings write theirs each second)."""
    seen = {}

    def matches():
        seen.update(scrape(server))
        return all(seen.get(name) == value for name, value in wanted.items())

    try:
        wait_until(matches, 30, what)
    except RuntimeError:
        raise AssertionError("%s: wanted %s, /metrics gave %s" % (
            what, wanted, {name: seen.get(name) for name in wanted})) from None


def hold_polls(port, count, since):
    sockets = []
    for _ in range(count):
        held = socket.create_connection(("127.0.0.1", port), timeout=30)
        held.sendall(b"GET /rooms/%s/msgs?since=%d&timeout=60 HTTP/1.1\r\nHost: test\r\n\r\n"
                     % (ROOM.encode(), since))
        sockets.append(held)
    return sockets


def test_metrics_refuses_a_query_string_with_json(wsgi):
    answer = wsgi("GET", "/metrics", query="name[]=x&%ff")
    assert answer.status == 400
    assert "no query parameters" in answer.json["error"]


def test_metrics_counts_refusals_by_reason(wsgi):
    before = wsgi("GET", "/stats").json["refusals"]
    wsgi("GET", "/rooms/lobby/msgs", query="since=-x")
    wsgi("POST", "/rooms/lobby/msgs", body=b"{}", headers={"Content-Type": "text/plain"})
    after = wsgi("GET", "/stats").json["refusals"]
    assert after.get("bad_request", 0) - before.get("bad_request", 0) == 1
    assert after.get("unsupported_media_type", 0) - before.get("unsupported_media_type", 0) == 1


def test_metrics_names_the_format_prometheus_client_writes():
    import prometheus_client
    assert chattle_metrics.CONTENT_TYPE == prometheus_client.CONTENT_TYPE_PLAIN_0_0_4


def test_docs_list_every_metric_the_code_gives():
    with open(os.path.join(ROOT, "docs", "deploy.md")) as page:
        section = page.read().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `(chattle_[a-z_]+)` \|", section, re.M)
    assert listed == chattle_metrics.metric_names()


@pytest.mark.slow
def test_held_polls_of_two_workers_through_prometheus(redis_server, start_chattle, tmp_path):
    from conftest import require_program
    require_program("prometheus")
    server = start_chattle(workers=2, redis_url=redis_server.url)
    for number in range(3):
        post(server, ROOM, "before %d" % number)
    get_json(server.url + "/rooms/lobby/msgs?since=x")  # refused: bad_request, on one worker or the other
    held = hold_polls(server.port, HELD, since=3)
    watcher = None
    try:
        # the harness's count: every poll the test holds, as /stats of each worker says
        wait_for_waiters_across_workers(server, HELD)
        until_scraped(server, {"chattle_held_polls": HELD, "chattle_posts_total": 3, "chattle_workers{bus=redis}": 2,
                               "chattle_refusals_total{reason=bad_request}": 1}, "/metrics summed over workers")
        watcher = Prometheus("127.0.0.1:%d" % server.port, str(tmp_path / "prometheus"))
        seen = []

        def prometheus_has_them():
            seen.append(watcher.query("chattle_held_polls"))
            return seen[-1] == HELD

        try:
            wait_until(prometheus_has_them, 60, "Prometheus's chattle_held_polls")
        except RuntimeError:
            raise AssertionError("Prometheus said %s held polls, the test holds %d" % (seen[-3:], HELD)) from None
        by_worker = {}
        wait_until(lambda: by_worker.update([(body["pid"], body["waiters"]) for body in [stats(server)]])
                   or len(by_worker) == 2, 30, "both workers' /stats")
        holding = [pid for pid, waiters in by_worker.items() if waiters]
        post(server, ROOM, "wakes them all")
        until_scraped(server, {"chattle_held_polls": 0, "chattle_deliveries_total": HELD, "chattle_posts_total": 4,
                               "chattle_fan_out_seconds_count": len(holding)}, "after the fan-out")
        # every counter is what /stats says, summed over the workers
        newest = {}
        wait_until(lambda: newest.update([(body["pid"], body) for body in [stats(server)]]) or len(newest) == 2, 30,
                   "both workers' /stats")
        until_scraped(server, {"chattle_%s_total" % name: sum(body[figure] for body in newest.values())
                               for name, figure in (("posts", "posts"), ("deliveries", "deliveries"),
                                                    ("answers_encoded", "encodes"),
                                                    ("bus_posts_received", "bus_posts_received"))},
                      "/metrics against /stats summed")
        # the worker that woke the most polls restarted: its counters stay in the sums, its gauges go with it
        for connection in held:  # answered: closed, so that the worker's graceful stop waits for none
            connection.close()
        old = server.worker_pids()
        os.kill(max(by_worker, key=by_worker.get), signal.SIGTERM)
        wait_until(lambda: len(set(server.worker_pids()) - set(old)) == 1 and len(server.worker_pids()) == 2, 60,
                   "a new worker")
        until_scraped(server, {"chattle_workers{bus=redis}": 2, "chattle_deliveries_total": HELD,
                               "chattle_posts_total": 4, "chattle_refusals_total{reason=bad_request}": 1},
                      "after a worker restarted")
    finally:
        for connection in held:
            connection.close()
        if watcher is not None:
            watcher.stop()



@pytest.mark.slow
def test_make_run_monitor_starts_a_prometheus_that_scrapes_it_and_stops_with_it(tmp_path):
    """harness.run_server --monitor, as `make run MONITOR=1` runs it."""
    import subprocess
    import sys

    from conftest import require_program
    from harness.monitor import query
    from harness.processes import free_port
    require_program("prometheus")
    run = subprocess.Popen([sys.executable, "-m", "harness.run_server", "--port", str(free_port()), "--monitor",
                            "--report-root", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        found = None
        while found is None and len(lines) < 50:
            line = run.stdout.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"prometheus on (http://127\.0\.0\.1:(\d+))/ .*\(pid (\d+); config (\S+)\)", line)
        assert found, "".join(lines)
        assert found.group(4).startswith(str(tmp_path))
        wait_until(lambda: query(found.group(1), 'chattle_workers{bus="memory"}') == 1, 30,
                   "a scrape of the run's server, asked of its Prometheus")
        prometheus_pid = int(found.group(3))
        run.send_signal(signal.SIGTERM)
        run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate(timeout=10)
    outlived = os.path.exists("/proc/%d" % prometheus_pid)
    if outlived:
        os.kill(prometheus_pid, signal.SIGKILL)  # started by this test, through the run
    assert not outlived, "Prometheus outlived the run"


def test_posts_added_back_to_back_count_each_woken_poll_once():
    """The shared bus's reader adds a batch of posts without yielding: the polls the first
    woke are still counted as waiting when the second arrives, and must not count again."""
    import gevent

    from chattle_rooms import Rooms
    from clients import settle
    rooms = Rooms(history=10)
    room = rooms.get("batch")
    polls = [gevent.spawn(room.wait_for_news, 0, 30) for _ in range(25)]
    settle(lambda: room.waiting == 25, "25 parked polls")
    room.add(1, b'{"id":1}')
    room.add(2, b'{"id":2}')
    gevent.joinall(polls, timeout=10)
    settle(lambda: rooms.fan_out_times.figures()["count"] >= 1, "the fan-out timed")
    assert (rooms.deliveries, rooms.fan_out_times.figures()["count"]) == (25, 1)
