"""The load harness's parts, each on its own: the framing parser the rig and the load
client share, the HdrHistogram latency figures, the ledger's travelling form, the
worker-to-master tally, and the long-poll client's kernel timestamps on real sockets."""

import json
import socket
import threading
import time

import gevent
import msgpack
import pytest

from instruments.httpframe import FramingError, ResponseParser
from instruments.measures import DeliveryLedger, LatencyHistogram, latency_summary, percentile
from loadtests.longpoll import BadAnswer, ConnectionLost, DriverDied, HeldPolls, LongPollClient
from loadtests.tally import RunTally, WorkerTally

ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"
          b'{"cursor": 7}')


# -- the framing parser ----------------------------------------------------------------------------

def test_an_answer_fed_byte_by_byte_comes_out_once_whole():
    parser = ResponseParser()
    answers = [parser.feed(ANSWER[i:i + 1]) for i in range(len(ANSWER))]
    assert answers[:-1] == [None] * (len(ANSWER) - 1)
    assert answers[-1].status == 200 and answers[-1].body == b'{"cursor": 7}' and answers[-1].keep_alive
    assert not parser.pending


def test_pipelined_answers_are_cut_apart_and_the_rest_is_kept():
    parser = ResponseParser()
    second = ANSWER.replace(b"200 OK", b"201 Created")
    first = parser.feed(ANSWER + second[:30])
    assert first.status == 200 and parser.pending
    assert parser.feed(second[30:]).status == 201


def test_chunked_answers_in_pieces_with_an_extension_and_a_trailer():
    wire = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;name=x\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n" + ANSWER)
    parser = ResponseParser()
    got = [answer for answer in (parser.feed(wire[i:i + 7]) for i in range(0, len(wire), 7)) if answer]
    assert [answer.body for answer in got] == [b"hello world", b'{"cursor": 7}']


def test_a_close_delimited_answer_ends_at_eof_and_closes():
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\npart one,") is None
    assert parser.feed(b" part two") is None
    answer = parser.feed_eof()
    assert answer.body == b"part one, part two" and not answer.keep_alive


def test_connection_close_and_a_broken_stream_are_told_apart():
    parser = ResponseParser()
    answer = parser.feed(ANSWER.replace(b"Content-Type", b"Connection: close\r\nContent-Type"))
    assert answer is not None and not answer.keep_alive
    parser.feed(ANSWER[:40])
    with pytest.raises(FramingError):
        parser.feed_eof()
    with pytest.raises(FramingError):
        ResponseParser().feed(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    with pytest.raises(FramingError):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000)


# -- latency figures ------------------------------------------------------------------------------

def test_histogram_percentiles_match_the_exact_ones_to_three_digits():
    values = [0.0001 * (1.003 ** i) for i in range(3000)]   # 100 us to about 0.8 s
    histogram = LatencyHistogram()
    for value in values:
        histogram.record(value)
    exact = sorted(values)
    for fraction in (0.5, 0.95, 0.99):
        assert histogram.percentile(fraction) == pytest.approx(percentile(exact, fraction), rel=2e-3)
    assert histogram.summary()["max"] == pytest.approx(max(values), rel=1e-3)
    assert latency_summary(values)["p99"] == histogram.summary()["p99"]


def test_counting_by_bucket_first_gives_what_hdrhistogram_gives_bucket_for_bucket():
    """LatencyHistogram counts values in a dict by their top 11 bits before they reach the
    HdrHistogram; that must be HdrHistogram's own bucketing at 3 digits (2048 sub-buckets)."""
    from hdrh.histogram import HdrHistogram

    from instruments.measures import LATENCY_HIGHEST_US, SIGNIFICANT_BITS
    direct = HdrHistogram(1, LATENCY_HIGHEST_US, 3)
    assert direct.sub_bucket_count == 2 ** SIGNIFICANT_BITS
    ours = LatencyHistogram()
    values = [int(1.0007 ** i) + i % 7 for i in range(1, 30000)]  # 1 us to about 1.3 s, every magnitude
    values += [2 ** 31 - 1, 2 ** 31, 10 ** 9 + 7, LATENCY_HIGHEST_US]
    for value in values:
        direct.record_value(value)
        ours.record(value / 1e6)
    assert len(ours._pending) < len(values)
    mine = [(item.value_iterated_to, item.count_at_value_iterated_to) for item in ours._hdr.get_recorded_iterator()]
    theirs = [(item.value_iterated_to, item.count_at_value_iterated_to) for item in direct.get_recorded_iterator()]
    assert mine == theirs
    # instruments.measures fills the HdrHistogram's counts itself (_record_counted): the same array
    assert list(ours._hdr.counts) == list(direct.counts)
    assert (ours._hdr.get_total_count(), ours._hdr.min_value, ours._hdr.get_max_value()) == \
        (direct.get_total_count(), direct.min_value, direct.get_max_value())


def test_histograms_travel_and_add_up():
    first, second = LatencyHistogram(), LatencyHistogram()
    for i in range(1, 1001):
        first.record(i / 1e4)
        second.record(i / 1e3)
    wire = msgpack.unpackb(msgpack.packb(first.to_dict()))   # as Locust ships a report
    merged = LatencyHistogram.from_dict(wire).add(second)
    assert merged.count == 2000
    assert merged.percentile(0.25) == pytest.approx(0.0455, rel=2e-3)   # 455 of the first, 45 of the second
    assert merged.summary()["max"] == pytest.approx(1.0, rel=1e-3)


def test_values_below_a_microsecond_are_counted_never_negative():
    histogram = LatencyHistogram()
    histogram.record(-0.002)
    histogram.record(0.0000001)
    histogram.record(0.5)
    assert histogram.below_resolution == 2
    assert histogram.summary()["p50"] == pytest.approx(1e-6)
    assert LatencyHistogram.from_dict(histogram.to_dict()).below_resolution == 2


def test_a_ledger_travels_with_its_gaps():
    ledger = DeliveryLedger(10)
    for message_id in (11, 14, 12, 12, 16):
        ledger.record(message_id)
    copy = DeliveryLedger.from_dict(msgpack.unpackb(msgpack.packb(ledger.to_dict())))
    assert copy.to_dict() == ledger.to_dict()
    assert copy.lost(16) == ledger.lost(16) == 2      # 13 and 15
    assert (copy.duplicated, copy.out_of_order) == (1, 1)


# -- worker to master ------------------------------------------------------------------------------

def test_worker_reports_add_up_to_the_run_exactly_once():
    worker = WorkerTally()
    worker.test_started()
    now = time.time()
    worker.listener_started()
    for i in range(100):
        worker.delivery(now - 1.0, now - 1.0 + 0.0002, now - 1.0 - 0.01 - i / 1e4)
    worker.post("load-0", 1, now - 2)
    first = msgpack.unpackb(msgpack.packb(worker.take_report()), strict_map_key=False)
    worker.delivery(now, now + 0.0001, now - 0.02)
    worker.listener_ended({"listener": "a", "room": "load-0", "ledger": DeliveryLedger(0).to_dict(), "polls": 3,
                           "caught_up": 0, "gave_up": None})
    last = msgpack.unpackb(msgpack.packb(worker.take_report(final=True)), strict_map_key=False)
    run = RunTally()
    run.merge("w1", first)
    assert not run.drained()                       # a listener still running
    run.merge("w1", last)
    assert run.drained() and run.workers["w1"]["final"]
    assert run.latency.count == run.lag.count == 101
    assert sum(pair[0].count for pair in run.seconds.values()) == 101  # every second shipped once
    assert run.posts == [["load-0", 1, now - 2, None]] and len(run.listeners) == 1
    assert run.lag.percentile(0.5) == pytest.approx(0.0002, rel=2e-3)
    assert run.latency.summary()["p50"] == pytest.approx(0.015, rel=5e-3)
    again = RunTally.from_dict(json.loads(json.dumps(run.to_dict())))
    assert again.latency.summary() == run.latency.summary()


def test_a_listener_stopped_before_its_first_answer_counts_as_gave_up_and_the_report_still_builds():
    # Seen once under contention: a listener with no ledger broke the whole report.
    from loadtests.report import listener_figures
    worker = WorkerTally()
    worker.test_started()
    for name, ledger, gave_up in (("a", DeliveryLedger(0), None), ("b", None, "stopped before its first answer")):
        worker.listener_started()
        worker.listener_ended({"listener": name, "room": "load-0", "ledger": ledger and ledger.to_dict(),
                               "polls": 1, "caught_up": 0, "listened_until": 0, "gave_up": gave_up})
    run = RunTally()
    run.merge("w1", msgpack.unpackb(msgpack.packb(worker.take_report(final=True)), strict_map_key=False))
    delivery, _final_ids = listener_figures(run, {"load-0": 0})
    assert (delivery["listeners"], delivery["lost"], delivery["gave_up"]) == (1, 0, 1)
    assert delivery["gave_up_reasons"] == {"stopped before its first answer": 1}


def _judged(tmp_path, machine_cpu=20.0, fatal=None, **cpu):
    """build_summary's checks and CPU figures of a tiny clean run: one listener that got its
    one message, the held polls at the target, `cpu` as run.py and the workers give it."""
    import os

    from loadtests.report import build_summary
    worker = WorkerTally()
    worker.test_started()
    worker.listener_started()
    worker.delivery(1010.2, 1010.2002, 1010.1)
    worker.post("load-0", 1, 1010.1)
    ledger = DeliveryLedger(0)
    ledger.record(1)
    worker.listener_ended({"listener": "a", "room": "load-0", "ledger": ledger.to_dict(), "polls": 2,
                           "caught_up": 0, "listened_until": 1, "gave_up": None})
    worker.fatal = fatal
    report = worker.take_report(final=True)
    report["cpu_seconds"] = cpu.pop("reported", 1.0)
    run = RunTally()
    run.merge("w1", report)
    run.shape_started = 1000.0
    os.makedirs(str(tmp_path / "raw"))
    run.write(str(tmp_path / "raw" / "run.json"))
    stages = [{"name": "ramp", "start": 0, "end": 10, "users": 2},
              {"name": "bursts", "start": 10, "end": 18, "users": 2}]
    run_info = dict({"users": 1, "posters": 1, "stages": stages, "servers": [], "locust_started": 995.0,
                     "started": 990.0, "server_cpu_seconds": 10.0}, **cpu)
    samples = [{"time": 1000.0 + t, "seconds": 1.0, "held_polls": 1, "machine_cpu": machine_cpu}
               for t in range(18)]
    summary, _tally = build_summary(str(tmp_path), run_info, samples, {"load-0": 1})
    return summary


def test_the_client_cpu_is_a_cost_with_a_warning_and_counts_every_process_but_the_servers(tmp_path):
    summary = _judged(tmp_path, reported=4.0, client_cpu_seconds_sampled=5.0, client_cpu_seconds_reaped=6.0,
                      orchestrator_cpu_seconds=1.5)
    cpu = summary["cpu"]
    # Locust: the largest of three lower bounds of the same processes; then the orchestrator
    assert (cpu["locust_cpu_s"], cpu["client_cpu_s"], cpu["client_over_server"]) == (6.0, 7.5, 0.75)
    assert summary["passed"], [check for check in summary["checks"] if not check["passed"]]
    assert len(summary["warnings"]) == 1 and "0.75" in summary["warnings"][0]
    assert _judged(tmp_path / "cheap", reported=2.0, orchestrator_cpu_seconds=0.5)["warnings"] == []


def test_a_machine_bound_run_or_a_load_process_that_could_not_go_on_fails(tmp_path):
    import os
    saturated = _judged(tmp_path / "saturated", machine_cpu=100.0 * os.cpu_count())
    assert [check["check"] for check in saturated["checks"] if not check["passed"]] == \
        ["the machine was not saturated"]
    fatal = _judged(tmp_path / "fatal", fatal="the held-poll driver died: RuntimeError: x")
    assert [check["detail"] for check in fatal["checks"] if not check["passed"]] == \
        ["load worker w1 on %s: the held-poll driver died: RuntimeError: x" % socket.gethostname()]


# -- the long-poll client on real sockets -----------------------------------------------------------

def test_the_client_polls_with_keep_alive_and_fires_one_request_event_each(start_chattle):
    server = start_chattle()
    fired = []

    class Event:
        def fire(self, **kwargs):
            fired.append(kwargs)
    client = LongPollClient(server.url, Event(), timeout=10)
    first = client.get("/rooms/client/msgs", name="first")
    assert first.status == 200
    connection = client._sock
    posted = client.post("/rooms/client/msgs", json.dumps({"from": "t", "content": "hi"}).encode(), name="post")
    assert posted.status == 201
    cursor = json.loads(first.body)["cursor"]
    poll = client.get("/rooms/client/msgs?since=%d&timeout=5" % cursor, name="poll")
    assert json.loads(poll.body)["messages"][0]["content"] == "hi"
    assert client._sock is connection               # one connection for all three
    assert [event["name"] for event in fired] == ["first", "post", "poll"]
    assert all(event["exception"] is None and event["response_time"] >= 0 for event in fired)
    assert poll.sent_at <= poll.arrived_at <= poll.read_at
    client.close()


class _Recorded:
    """events.request stand-in: keeps what was fired."""

    def __init__(self):
        self.fired = []

    def fire(self, **kwargs):
        self.fired.append(kwargs)


def _until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        gevent.sleep(0.02)
    return condition()


def test_held_polls_connect_ask_the_cursor_first_and_log_a_fan_outs_answers_in_bulk(start_chattle):
    """Each listener's connection is made on the driver's epoll set, its first request is
    the poll without since (a request event of its own, timed); the answers of the
    fan-out that follows reach Locust's statistics in batches, all of them counted."""
    server = start_chattle()
    event, logged, answers, failures, delivered_bytes = _Recorded(), [], {}, [], []
    polls = HeldPolls(event, answer_deadline=10, log_answers=lambda count, length: logged.append((count, length)))

    def listener(number):
        def on_answer(reply):
            body = json.loads(reply.body)
            answers.setdefault(number, []).append(body)
            if body["messages"]:
                delivered_bytes.append(len(reply.body))
                return None                                 # one message, then stop
            return body["cursor"]
        return on_answer
    for number in range(20):
        polls.hold(LongPollClient(server.url), "/rooms/held/msgs?since=", None, "&timeout=5", listener(number),
                   failures.append, "/rooms/held/msgs", "poll (first)")
    assert _until(lambda: len(answers) == 20 and len(polls) == 20), (answers, failures)
    poster = LongPollClient(server.url)
    assert poster.post("/rooms/held/msgs", b'{"from": "t", "content": "hi"}').status == 201
    assert _until(lambda: len(polls) == 0), (len(polls), failures)
    poster.close()
    assert failures == []
    assert all(answers[number][1]["messages"][0]["content"] == "hi" for number in range(20))
    assert [fired["name"] for fired in event.fired] == ["poll (first)"] * 20
    assert all(fired["response_time"] >= 0 and fired["exception"] is None for fired in event.fired)
    assert sum(count for count, _length in logged) == 20
    assert sum(length for _count, length in logged) == sum(delivered_bytes)


def test_a_released_poll_leaves_the_epoll_set_with_its_close_and_its_descriptor_can_be_held_again(start_chattle):
    """release() closes without an epoll_ctl of its own: the close must take the socket
    out of the set, or the next connection given the same descriptor number could not be
    registered (EEXIST) and an answer on it would reach the old listener."""
    server = start_chattle()
    answers, failures = [], []
    polls = HeldPolls(_Recorded(), answer_deadline=10)

    def hold(number):
        def on_answer(reply):
            answers.append((number, json.loads(reply.body)["cursor"]))
            return json.loads(reply.body)["cursor"]
        return polls.hold(LongPollClient(server.url), "/rooms/again/msgs?since=", None, "&timeout=5", on_answer,
                          failures.append, "/rooms/again/msgs", "poll (first)")
    first = hold(1)
    assert _until(lambda: answers), failures
    descriptor = first.fd
    polls.release(first)
    assert len(polls) == 0
    second = hold(2)
    assert second.fd == descriptor            # the lowest free number: the one just closed
    assert _until(lambda: len(answers) == 2), (answers, failures)
    assert answers[1][0] == 2 and failures == []
    polls.release(second)


def test_a_held_poll_that_cannot_connect_fails_once_with_the_reason():
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()                                     # nothing listens there now
    event, failures = _Recorded(), []
    polls = HeldPolls(event, answer_deadline=10, log_answers=lambda count, length: None)
    polls.hold(LongPollClient("http://127.0.0.1:%d" % port), "/rooms/r/msgs?since=", None, "&timeout=5",
               lambda reply: 1, failures.append, "/rooms/r/msgs", "poll (first)")
    assert _until(lambda: failures), failures
    assert _until(lambda: polls._driver.dead)           # nothing held: the driver is done, no more events
    assert failures == ["connect: Connection refused"] and len(polls) == 0
    assert [(fired["name"], str(fired["exception"])) for fired in event.fired] == \
        [("poll (first)", "connect: Connection refused")]


def test_a_held_poll_never_answered_fails_at_its_deadline_with_the_reason():
    """A server that takes the connection and the poll and says nothing: the poll fails
    once, at a sweep after its answer deadline. (How soon after is the machine's: not
    asserted here.)"""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    event, failures = _Recorded(), []
    polls = HeldPolls(event, answer_deadline=0.5, log_answers=lambda count, length: None)
    polls.sweep_seconds = 0.2
    started = time.monotonic()
    polls.hold(LongPollClient("http://127.0.0.1:%d" % silent.getsockname()[1]), "/rooms/r/msgs?since=", None,
               "&timeout=5", lambda reply: 1, failures.append, "/rooms/r/msgs", "poll (first)")
    try:
        assert _until(lambda: failures, 5.0), failures
        waited = time.monotonic() - started
    finally:
        silent.close()
    assert failures == ["poll: no answer within 0.5s"] and len(polls) == 0
    assert waited >= 0.5, waited
    assert [str(fired["exception"]) for fired in event.fired] == ["poll: no answer within 0.5s"]


def test_kernel_arrival_shows_a_client_that_reads_late_as_client_lag():
    """The answer reaches the socket; the client reads it 0.3 s later. The kernel
    timestamp keeps the arrival time, so the stall shows as lag, not as latency."""
    from gevent.socket import wait_read
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        while conn.recv(4096):
            conn.sendall(ANSWER)
        conn.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = LongPollClient("http://127.0.0.1:%d" % listener.getsockname()[1], None, timeout=5)
    client._connect()
    sock = client._sock
    # The kernel turns receive timestamps on in deferred work (a kworker) after the first
    # socket asks: the first answers may come unstamped, for as long as a busy machine
    # keeps that kworker waiting, so ask until one is.
    stamped, deadline = False, time.monotonic() + 20
    while not stamped and time.monotonic() < deadline:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        stamped = client._read(time.time()).stamped
    assert stamped, "the kernel stamped no answer in 20 s: are receive timestamps (SO_TIMESTAMPNS) available?"
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_read(sock.fileno(), 5)                        # the answer is in the socket
    waiting_since = time.time()
    gevent.sleep(0.3)                                  # the client is busy elsewhere
    reply = client._read(time.time())
    assert reply.stamped and reply.arrived_at <= waiting_since
    assert reply.read_at - reply.arrived_at >= 0.3
    client.close()
    thread.join(5)
    listener.close()


def test_a_server_that_closes_mid_answer_is_a_lost_connection_not_an_answer():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(ANSWER[:50])
        conn.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    fired = []

    class Event:
        def fire(self, **kwargs):
            fired.append(kwargs)
    client = LongPollClient("http://127.0.0.1:%d" % listener.getsockname()[1], Event(), timeout=5)
    with pytest.raises((ConnectionLost, FramingError)):
        client.get("/x", name="x")
    assert fired and fired[0]["exception"] is not None
    assert client._sock is None
    thread.join(5)
    listener.close()


def test_a_fan_outs_identical_bodies_are_parsed_once_and_the_cache_stays_bounded():
    from loadtests.locustfile import ParsedAnswers
    answers = ParsedAnswers()
    body = b'{"room":"r","messages":[{"id":7,"from":"a","content":"x","ts":1.5},' \
           b'{"id":8,"from":"a","content":"y","ts":2.5}],"cursor":8,"missed":3}'
    first = answers.parse(body)
    assert first == (((7, 1.5), (8, 2.5)), 3, False)
    assert answers.parse(bytes(body)) is first                     # equal bytes, one parse
    for n in range(ParsedAnswers.MAX_BODIES + 10):
        answers.parse(b'{"messages":[],"cursor":%d,"reset":true}' % n)
    assert len(answers._parsed) <= ParsedAnswers.MAX_BODIES
    assert answers.parse(b'{"messages":[],"cursor":1,"reset":true}')[2] is True


def test_heads_are_framed_once_each_and_the_table_stays_bounded():
    from instruments import httpframe
    for n in range(httpframe.MAX_FRAMINGS_KEPT + 10):
        answer = ResponseParser().feed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n + b"x" * n)
        assert len(answer.body) == n
    assert len(httpframe._FRAMINGS) <= httpframe.MAX_FRAMINGS_KEPT
    with pytest.raises(FramingError):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n")


def test_a_whole_answer_read_again_is_framed_once_and_the_table_stays_bounded():
    from instruments import httpframe
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    first = ResponseParser().feed(answer)
    assert ResponseParser().feed(bytes(answer)) is first             # equal bytes, one framing
    parser = ResponseParser()
    assert parser.feed(answer[:10]) is None                         # in pieces: framed as ever
    assert parser.feed(answer[10:]).body == b"{}" and not parser.pending
    pipelined = ResponseParser()
    assert pipelined.feed(answer + answer[:5]).body == b"{}"        # more than one answer: not kept
    assert answer + answer[:5] not in httpframe._WHOLE_ANSWERS and pipelined.pending
    for n in range(httpframe.MAX_WHOLE_ANSWERS_KEPT + 10):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(b"%d" % n) + b"%d" % n)
    assert len(httpframe._WHOLE_ANSWERS) <= httpframe.MAX_WHOLE_ANSWERS_KEPT
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % httpframe.MAX_WHOLE_ANSWER_BYTES
    assert len(ResponseParser().feed(big + b"x" * httpframe.MAX_WHOLE_ANSWER_BYTES).body) == \
        httpframe.MAX_WHOLE_ANSWER_BYTES
    assert not any(len(data) > httpframe.MAX_WHOLE_ANSWER_BYTES for data in httpframe._WHOLE_ANSWERS)


# -- one bad answer costs one poll ------------------------------------------------------------------

def test_an_answer_its_listener_refuses_costs_that_poll_alone_and_the_listener_resumes_from_its_cursor(
        start_chattle):
    """Ten held polls; one listener refuses the answer to a post (BadAnswer). That poll
    alone fails, fired to Locust with its reason and told to its listener once; the nine
    others take the post and stay held; the refusing listener, holding again from its
    cursor, still gets the post: nothing lost."""
    server = start_chattle()
    event, failures, cursors, got = _Recorded(), [], {}, {}
    polls = HeldPolls(event, answer_deadline=10, log_answers=lambda count, length: None)
    refuse = {3}

    def listener(number):
        def on_answer(reply):
            body = json.loads(reply.body)
            if body["messages"] and number in refuse:
                refuse.discard(number)
                raise BadAnswer("refused on purpose")
            got.setdefault(number, []).extend(message["content"] for message in body["messages"])
            cursors[number] = body["cursor"]
            return body["cursor"]
        return on_answer

    def hold(number, cursor=None):
        polls.hold(LongPollClient(server.url), "/rooms/bad/msgs?since=", cursor, "&timeout=5", listener(number),
                   lambda reason: failures.append((number, reason)), "/rooms/bad/msgs", "poll (first)")
    for number in range(10):
        hold(number)
    assert _until(lambda: len(cursors) == 10 and len(polls) == 10), failures
    before = dict(cursors)
    poster = LongPollClient(server.url)
    assert poster.post("/rooms/bad/msgs", b'{"from": "t", "content": "hi"}').status == 201
    poster.close()
    assert _until(lambda: len(failures) == 1 and all(got.get(n) == ["hi"] for n in range(10) if n != 3)), \
        (failures, got)
    assert failures == [(3, "poll: BadAnswer: refused on purpose")] and len(polls) == 9
    assert [str(fired["exception"]) for fired in event.fired if fired["exception"]] == \
        ["poll: BadAnswer: refused on purpose"]
    hold(3, before[3])                                 # the listener polls again from its cursor
    assert _until(lambda: got.get(3) == ["hi"]), got
    assert len(failures) == 1
    for held in list(polls._held.values()):
        polls.release(held)


def test_a_driver_that_dies_fails_every_held_poll_at_once_with_the_reason_and_refuses_new_ones(start_chattle):
    server = start_chattle()
    event, failures, deaths, cursors = _Recorded(), [], [], {}
    polls = HeldPolls(event, answer_deadline=10, log_answers=lambda count, length: None,
                      on_driver_death=deaths.append)

    def on_answer(number):
        def take(reply):
            cursors[number] = json.loads(reply.body)["cursor"]
            return cursors[number]
        return take
    for number in range(3):
        polls.hold(LongPollClient(server.url), "/rooms/dies/msgs?since=", None, "&timeout=5", on_answer(number),
                   failures.append, "/rooms/dies/msgs", "poll (first)")
    assert _until(lambda: len(cursors) == 3 and len(polls) == 3), failures

    def broken():
        raise RuntimeError("broken on purpose")
    polls._drain = broken                              # the driver's own code fails at its next answer
    poster = LongPollClient(server.url)
    assert poster.post("/rooms/dies/msgs", b'{"from": "t", "content": "hi"}').status == 201
    poster.close()
    reason = "the held-poll driver died: RuntimeError: broken on purpose"
    assert _until(lambda: len(failures) == 3), failures
    assert failures == [reason] * 3 and deaths == [reason] and len(polls) == 0
    assert [str(fired["exception"]) for fired in event.fired if fired["exception"]] == [reason] * 3
    with pytest.raises(DriverDied):
        polls.hold(LongPollClient(server.url), "/rooms/dies/msgs?since=", 1, "&timeout=5", on_answer(9),
                   failures.append)


# -- the report's judgements ------------------------------------------------------------------------

def test_a_client_lag_over_a_tenth_of_the_servers_p99_makes_the_run_client_bound():
    from loadtests.report import client_bound_reason
    assert client_bound_reason({"p99": 0.600}, {"p99": 0.020}) is None
    assert client_bound_reason({"p99": 0.600}, {"p99": 0.060}) is None          # exactly a tenth
    assert "over 10%" in client_bound_reason({"p99": 0.600}, {"p99": 0.061})
    assert client_bound_reason({"p99": None}, {"p99": None}) is None


def test_a_few_milliseconds_of_client_lag_never_make_a_small_fan_out_client_bound():
    from loadtests.report import client_bound_reason
    # 100-listener rooms answer in about 20 ms: 5 ms of lag is over a tenth, under the floor
    assert client_bound_reason({"p99": 0.020}, {"p99": 0.005}) is None
    assert client_bound_reason({"p99": 0.020}, {"p99": 0.010}) is None          # exactly the floor
    assert "over 10 ms" in client_bound_reason({"p99": 0.020}, {"p99": 0.0101})


def test_the_machine_check_counts_saturated_burst_seconds():
    import os

    from loadtests.report import machine_check
    cores = os.cpu_count()
    run = {"locust_started": 990.0, "shape_started": 1000.0, "stages": [{"name": "ramp", "start": 0, "end": 10},
                                                {"name": "bursts", "start": 10, "end": 18}]}

    def samples(busy_seconds):
        return [{"time": 1000.0 + t, "machine_cpu": 100.0 * cores if t in busy_seconds else 20.0}
                for t in range(0, 18)]
    quiet = machine_check(samples({3}), run)           # busy in the ramp only
    assert quiet["burst_seconds"] == 8 and quiet["burst_seconds_saturated"] == 0 and not quiet["machine_bound"]
    assert quiet["saturated_seconds"] == [3.0]
    edge = machine_check(samples({10, 11}), run)       # 2 of 8: a quarter, not more
    assert edge["burst_share"] == 0.25 and not edge["machine_bound"]
    bound = machine_check(samples({10, 11, 12}), run)
    assert bound["machine_bound"]
    # The sampler late: one saturated row covering 3 s weighs 3 s, not one.
    late = [{"time": 1000.0 + t, "seconds": 1.0, "machine_cpu": 20.0} for t in range(10, 15)]
    late.append({"time": 1018.0 - 0.5, "seconds": 3.0, "machine_cpu": 100.0 * cores})
    weighed = machine_check(late, run)
    assert weighed["burst_seconds"] == 8 and weighed["burst_seconds_saturated"] == 3
    assert weighed["burst_share"] == 3 / 8 and weighed["machine_bound"]


def test_a_worker_whose_driver_died_says_so_at_once_and_the_master_stops_the_run(monkeypatch):
    """The driver's death reaches the worker's next report (sent at once), and the master,
    merging it, asks the shape to stop the run the way a run ends."""
    import gevent

    from loadtests import locustfile
    from loadtests.shapes import StagedShape
    monkeypatch.setattr(locustfile, "TALLY", WorkerTally())
    monkeypatch.setattr(locustfile, "RUN", RunTally())
    monkeypatch.setattr(StagedShape, "stop_requested_at", None)
    sent = []
    monkeypatch.setattr(locustfile, "report_now", sent.append)
    locustfile.driver_died("the environment", "the held-poll driver died: RuntimeError: x")
    gevent.sleep(0)
    assert sent == ["the environment"]
    report = msgpack.unpackb(msgpack.packb(locustfile.TALLY.take_report()), strict_map_key=False)
    assert report["fatal"] == "the held-poll driver died: RuntimeError: x" and report["error_count"] == 1
    assert StagedShape.stop_requested_at is None
    locustfile.add_tally("w1", {"chattle": report})
    assert StagedShape.stop_requested_at is not None
    assert locustfile.RUN.fatal == "load worker w1 on %s: the held-poll driver died: RuntimeError: x" % \
        socket.gethostname()
