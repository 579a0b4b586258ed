"""`make load` against a server that answers garbage now and then: a loopback proxy in
front of a real `python chattle.py` turns exactly three held-poll answers into
well-framed 200s whose body is not JSON. Each costs one poll: counted as a failed
request with its reason, its listener polls again from its cursor, nothing is lost,
nobody else notices, and the run ends on time."""

import asyncio
import csv
import glob
import json
import os
import re
import subprocess
import sys
import threading

import pytest

from harness.processes import LOOPBACK

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GARBAGE = b"<html>not a poll's answer</html>"
HELD_POLL = re.compile(rb"^GET /rooms/[^/]+/msgs\?since=\d+&timeout=[1-9]")

pytestmark = pytest.mark.slow


class CorruptingProxy:
    """A TCP proxy on loopback that frames the server's answers (Content-Length, as
    Chattle sends them) and replaces the body of the first `budget` held-poll answers that
    carry messages with GARBAGE, the head's Content-Length corrected: well framed, not JSON.
    Runs an asyncio loop in a thread of its own; `close` ends it and every connection."""

    def __init__(self, target_port, budget=3):
        self.target_port, self.budget = target_port, budget
        self.corrupted = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "the proxy did not start"

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._connection, LOOPBACK, 0, backlog=2048))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    @property
    def url(self):
        return "http://%s:%d" % (LOOPBACK, self.port)

    def close(self):
        def stop():
            self.server.close()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.stop()
        self.loop.call_soon_threadsafe(stop)
        self.thread.join(10)

    async def _connection(self, client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        except OSError:
            client_writer.close()
            return
        held = []      # for each request sent on, in order: is it a held poll?
        try:
            await asyncio.gather(self._requests(client_reader, server_writer, held),
                                 self._answers(server_reader, client_writer, held))
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            client_writer.close()
            server_writer.close()

    async def _requests(self, reader, writer, held):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            body = await reader.readexactly(int(length.group(1))) if length else b""
            held.append(bool(HELD_POLL.match(head)))
            writer.write(head + body)
            await writer.drain()

    async def _answers(self, reader, writer, held):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            assert length, "the proxy frames answers by Content-Length: %r" % head
            body = await reader.readexactly(int(length.group(1)))
            was_held_poll = held.pop(0) if held else False
            if was_held_poll and self.corrupted < self.budget and head.startswith(b"HTTP/1.1 200") \
                    and b'"id"' in body:
                self.corrupted += 1
                head = head[:length.start(1)] + b"%d" % len(GARBAGE) + head[length.end(1):]
                body = GARBAGE
            writer.write(head + body)
            await writer.drain()


def test_three_garbage_answers_cost_three_polls_and_nothing_else(start_chattle, tmp_path):
    server = start_chattle()
    proxy = CorruptingProxy(int(server.url.rsplit(":", 1)[1]))
    users = 300
    try:
        run = subprocess.run(
            [sys.executable, "-m", "loadtests.run", "--host", proxy.url, "--users", str(users), "--duration", "25",
             "--spawn-rate", "300", "--burst-gap", "2", "--report-root", str(tmp_path)],
            cwd=ROOT, capture_output=True, text=True, timeout=25 + 30 + 90)   # ends on time: never at its deadline
    finally:
        proxy.close()
    assert proxy.corrupted == 3, run.stdout + run.stderr
    report = glob.glob(os.path.join(str(tmp_path), "*-load"))[0]
    with open(os.path.join(report, "summary.json")) as summary_file:
        summary = json.load(summary_file)
    delivery = summary["delivery"]
    assert (delivery["lost"], delivery["duplicated"], delivery["out_of_order"]) == (0, 0, 0), delivery
    assert delivery["gave_up"] <= 3 and delivery["listeners"] >= 0.95 * users, delivery
    assert summary["held_polls_peak"] >= 0.95 * users
    # the three bad answers are three failed requests, each with its reason, and fail the run
    assert summary["locust"]["failures"] == 3, summary["locust"]
    with open(os.path.join(report, "locust_failures.csv")) as failures_file:
        reasons = {row["Error"]: int(row["Occurrences"]) for row in csv.DictReader(failures_file)}
    assert sum(reasons.values()) == 3 and all("BadAnswer" in reason for reason in reasons), reasons
    failed = {check["check"] for check in summary["checks"] if not check["passed"]}
    assert "no request failed" in failed and run.returncode == 1, run.stdout
    # Whatever this machine's load did to the latency checks, nothing else failed.
    assert failed <= {"no request failed", "latency is the server's, not the client's",
                      "the machine was not saturated"}, summary["checks"]
