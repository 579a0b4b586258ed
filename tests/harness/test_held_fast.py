"""The held polls' compiled path (loadtests/_heldfast.c) against the Python path it
shortens: the same ledgers, deliveries, Locust counts and latency figures, on real sockets
against a real Chattle; and the batch forms of the measures against the one-value ones."""

import json
import os
import random
import socket
import time

import gevent
import numpy
import pytest

from instruments.measures import DeliveryLedger, LatencyHistogram
from loadtests import longpoll
from loadtests.longpoll import HeldPolls, LongPollClient
from loadtests.tally import WorkerTally

try:
    from loadtests import _heldfast
except ImportError:
    _heldfast = None

NOT_BUILT = "loadtests/_heldfast.c is not built: run `make venv` (it needs gcc and Python.h)"


def test_the_compiled_path_is_built():
    """`make` builds it (setup.py); it is optional only so that a machine without a C
    compiler still runs the load test, slower. Here it must be there."""
    assert _heldfast is not None, NOT_BUILT


@pytest.fixture
def heldfast():
    """The compiled module: a test that names it fails, never skips, when it is missing."""
    assert _heldfast is not None, NOT_BUILT
    return _heldfast


# -- the batch forms of the measures ---------------------------------------------------------------

def _histogram_state(histogram):
    return dict(histogram._pending), histogram.below_resolution


def test_recording_an_array_buckets_every_value_as_recording_one_at_a_time():
    values = [-0.5, -1e-7, 0.0, 4e-7, 5e-7, 1e-6, 2.047e-3, 2.048e-3, 2.049e-3, 0.1234567, 7.0, 3599.9, 3600.0, 9e9]
    generator = random.Random(3)
    values += [generator.uniform(0, 0.002) for _ in range(2000)]
    values += [generator.lognormvariate(-2, 2) for _ in range(5000)]
    one_at_a_time, batch = LatencyHistogram(), LatencyHistogram()
    for value in values:
        one_at_a_time.record(value)
    batch.record_many(numpy.array(values))
    assert _histogram_state(batch) == _histogram_state(one_at_a_time)
    assert batch.summary() == one_at_a_time.summary()


def test_a_batch_of_deliveries_is_tallied_as_each_one_would_be():
    generator = random.Random(5)
    count, ts = 3000, 1_700_000_000.25
    arrived = numpy.array([ts + generator.uniform(-0.001, 2.5) for _ in range(count)])
    read = arrived + numpy.array([generator.expovariate(200) for _ in range(count)])
    stamped = numpy.array([generator.random() < 0.9 for _ in range(count)])
    offset = numpy.array([generator.choice([0.0, 0.0004, -0.0002]) for _ in range(count)])
    bound = numpy.array([generator.choice([0.0, 0.0005]) for _ in range(count)])
    each, batch = WorkerTally(), WorkerTally()
    for index in range(count):
        each.delivery(arrived[index], read[index], ts, bool(stamped[index]), offset[index], bound[index])
    batch.delivery_batch(arrived, read, ts, stamped, offset, bound)
    assert (batch.deliveries, batch.unstamped, batch.under_bound) == (each.deliveries, each.unstamped, each.under_bound)
    assert sorted(batch.seconds) == sorted(each.seconds)
    for second in each.seconds:
        for kind in (0, 1):
            assert _histogram_state(batch.seconds[second][kind]) == _histogram_state(each.seconds[second][kind])


def test_a_run_of_ids_lands_in_the_ledger_as_each_id_would():
    for start, runs in [(0, [(1, 1), (2, 5), (1, 0), (6, 6), (7, 6)]), (10, [(11, 13), (12, 14)]),
                        (3, [(7, 9), (4, 6)])]:
        each, run = DeliveryLedger(start), DeliveryLedger(start)
        for first, last in runs:
            for message_id in range(first, last + 1):
                each.record(message_id)
            run.record_run(first, last)
        assert run.to_dict() == each.to_dict()


def test_only_a_plain_run_of_ids_is_taken_the_short_way():
    from loadtests.locustfile import ParsedAnswers
    answers = ParsedAnswers()

    def body(ids, **extra):
        return json.dumps(dict({"messages": [{"id": i, "ts": 1.5} for i in ids], "cursor": max(ids or [0])},
                               **extra)).encode()
    assert answers.run_of(body([7])) == (7, 7)
    assert answers.run_of(body([3, 4, 5])) == (3, 5)
    assert answers.run_of(body([3, 5])) is None                 # a gap: the ledger must see it
    assert answers.run_of(body([5, 4])) is None
    assert answers.run_of(body([])) == (1, 0)                  # a timeout: the empty run after the cursor
    assert answers.run_of(body([], missed=1)) is None
    assert answers.run_of(body([8], missed=2)) is None
    assert answers.run_of(body([8], reset=True)) is None
    assert answers.run_of(b"not json") is None


# -- one scenario, both paths, real sockets ----------------------------------------------------------

class _Listener:
    """The locustfile's Listener, its answer method and nothing else (no Locust user)."""

    def __init__(self, tally):
        from loadtests import locustfile
        self.tally = tally
        self.methods = locustfile.Listener
        self.held = None
        self.ledger = None
        self.polls = 0
        self.trouble_since = None
        self.retry = 0.5
        self.clock_offset = self.clock_bound = 0.0
        self.failures = []
        self.epoch, self.receipts, self.segments, self.poll_timeout = None, False, [], 1.0

    def on_answer(self, reply):
        return self.methods._answered(self, reply)

    def _segment(self, start, epoch):
        self.methods._segment(self, start, epoch)

    def _took_epoch(self, epoch):
        self.methods._took_epoch(self, epoch)

    def _reset_to(self, body):
        self.methods._reset_to(self, body)

    def _in_contact(self):
        self.methods._in_contact(self)

    def _broke(self, reason):
        self.failures.append(reason)

    def _note_missed(self, missed, reset):
        self.failures.append(("missed", missed, reset))


def _fan_out(server_url, compiled, room, listeners=40, bursts=(1, 3, 0, 1, 2, 1)):
    """`listeners` held polls of a second on `room`, then bursts of posts, each waited out
    (a burst of 0: a second and a half of quiet, every poll times out); what each path
    made of it."""
    from loadtests import locustfile
    tally = locustfile.TALLY = WorkerTally()
    logged, taken_short = [], []

    def on_runs(body, arrived, read, stamped, clock_offset, clock_bound):
        taken_short.append(len(arrived))
        locustfile.record_runs(body, arrived, read, stamped, clock_offset, clock_bound)
    polls = HeldPolls(None, answer_deadline=10, log_answers=lambda count, length: logged.append((count, length)),
                      in_order_run=locustfile.ANSWERS.run_of if compiled else None,
                      on_runs=on_runs if compiled else None)
    assert polls.compiled == compiled
    team = [_Listener(tally) for _ in range(listeners)]
    failures = []
    for listener in team:
        listener.held = polls.hold(LongPollClient(server_url), "/rooms/%s/msgs?since=" % room, None, "&timeout=1",
                                   listener.on_answer, failures.append, "/rooms/%s/msgs" % room, "poll (first)")
    _until(lambda: all(listener.ledger is not None for listener in team))
    poster = LongPollClient(server_url)
    posted = 0
    for size in bursts:
        if not size:
            # quiet until every poll has timed out once (an empty answer each)
            answered = [_answers(listener) for listener in team]
            assert _until(lambda answered=answered: all(_answers(listener) > before
                                                        for listener, before in zip(team, answered)))
        for sequence in range(size):
            assert poster.post("/rooms/%s/msgs" % room, json.dumps({"from": "t", "content": str(sequence)}).encode()
                               ).status == 201
        posted += size
        assert _until(lambda posted=posted: all(listener.ledger.received == posted for listener in team)), \
            [listener.ledger.received for listener in team]
    poster.close()
    for held in list(polls._held.values()):
        polls.release(held)
    polls.flush()                     # as a worker's report does before it reads the tally
    return {"ledgers": [dict(listener.ledger.to_dict(), start=None) for listener in team],
            "polls": sum(listener.polls + listener.held.fast_answers for listener in team),
            "failures": failures + [f for listener in team for f in listener.failures],
            "deliveries": tally.deliveries, "unstamped": tally.unstamped,
            "latencies": sum(pair[0].count for pair in tally.seconds.values()),
            "lags": sum(pair[1].count for pair in tally.seconds.values()),
            "logged_answers": sum(count for count, _length in logged)}, sum(taken_short), \
        sum(listener.held.fast_answers for listener in team)


def _answers(listener):
    return listener.polls + listener.held.fast_answers


def _until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        gevent.sleep(0.02)
    return condition()


def test_a_fan_out_comes_out_the_same_through_either_path(start_chattle, heldfast):
    """Forty listeners, five bursts (answers of one message, of several, of none: the
    polls' timeouts): every ledger, delivery and latency count the same through both
    paths, every answer counted once in Locust's statistics, and every answer the
    compiled path took is one its records brought to the tally."""
    server = start_chattle()
    python_path, taken_by_python, _none = _fan_out(server.url, compiled=False, room="python")
    compiled_path, taken_compiled, fast_answers = _fan_out(server.url, compiled=True, room="compiled")
    assert python_path["failures"] == [] and python_path["deliveries"] == 40 * 8
    answers = {}
    for name, path in (("python", python_path), ("compiled", compiled_path)):
        answers[name] = path.pop("polls")               # how many answers carried them is up to timing
        assert path.pop("logged_answers") == answers[name]
    assert compiled_path == python_path
    # How many answers the compiled path took is up to timing (a new answer's first
    # reader, a read in two pieces take the Python path): that it took some, and that
    # each one it took is one record, is not.
    assert taken_by_python == 0 and taken_compiled == fast_answers > 0, (taken_compiled, answers)


# -- drain() on its own -----------------------------------------------------------------------------

class _Held:
    """A HeldPoll's fields as drain() reads and writes them, its ledger at `next_expected`."""

    def __init__(self, sock, next_expected=None):
        self.sock, self.fd = sock, sock.fileno()
        self.fast = True
        self.request_head, self.request_tail = b"GET /r?since=", b" HTTP/1.1\r\n\r\n"
        self.sent_at = 0.0
        self.clock_offset, self.clock_bound = 0.25, 0.001
        self.ledger = DeliveryLedger(next_expected - 1) if next_expected is not None else None
        self.fast_answers = 0


@pytest.fixture
def connected_pairs():
    """(client, server) TCP pairs on loopback, the client non-blocking with kernel stamps
    on, as HeldPolls makes them; all closed after the test."""
    made = []

    def make(count):
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(count)
        pairs = []
        for _ in range(count):
            client = socket.create_connection(listening.getsockname())
            client.setblocking(False)
            client.setsockopt(socket.SOL_SOCKET, longpoll.SO_TIMESTAMPNS, 1)
            pairs.append((client, listening.accept()[0]))
        listening.close()
        made.extend(pairs)
        return pairs
    yield make
    for client, server in made:
        client.close()
        server.close()


def _until_ready(epoll, count, seconds=10.0):
    """Wait until `count` descriptors of a (level-triggered) epoll set are readable."""
    deadline = time.monotonic() + seconds
    while len(epoll.poll(0.05)) < count and time.monotonic() < deadline:
        pass
    assert len(epoll.poll(0)) >= count


def test_drain_takes_known_answers_and_hands_everything_else_back(connected_pairs, heldfast):
    from gevent.monkey import get_original
    epoll_class, EPOLLIN = get_original("select", ["epoll", "EPOLLIN"])
    pairs = connected_pairs(5)
    epoll = epoll_class()
    known_answer, unknown_answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"HTTP/1.1 200 OK\r\n\r\n??"
    taken, declined, unknown, not_fast, closed = [_Held(client, next_expected) for (client, _), next_expected in
                                                  zip(pairs, [11, 5, 11, 11, 11])]
    not_fast.fast = False
    held = {h.fd: h for h in (taken, declined, unknown, not_fast, closed)}
    for h in held.values():
        epoll.register(h.fd, EPOLLIN)
    for (_client, server), data in zip(pairs, [known_answer, known_answer, unknown_answer, known_answer, b""]):
        if data:
            server.sendall(data)
        else:
            server.shutdown(socket.SHUT_WR)
    _until_ready(epoll, 5)
    before = time.time()
    records, slow, answers, length = b"", [], 0, 0
    for _call in range(10):          # a new answer ends a call: the rest comes at the next
        more_records, more_slow, more_answers, more_length, failure = heldfast.drain(
            epoll.fileno(), 64, held, {known_answer: (3, 11, 12, 2)}, 0.0)
        assert failure is None
        if not more_records and not more_slow:
            break
        records, slow = records + more_records, slow + more_slow
        answers, length = answers + more_answers, length + more_length
        for fd, *_rest in more_slow:
            epoll.unregister(fd)     # the driver's own path has it now
    epoll.close()
    assert [entry[1] for entry in slow].count(unknown_answer) == 1
    assert (answers, length) == (1, 2)
    # the ledger at the run's first id moves past it, as DeliveryLedger.record_run; a ledger
    # elsewhere (here: a gap before the run) is left to the driver's own path
    assert (taken.ledger.next_expected, taken.ledger.received, taken.fast_answers) == (13, 2, 1)
    assert (declined.ledger.next_expected, declined.ledger.received, declined.fast_answers) == (5, 0, 0)
    assert (not_fast.ledger.received, not_fast.fast_answers) == (0, 0)
    assert pairs[0][1].recv(100) == b"GET /r?since=12 HTTP/1.1\r\n\r\n"
    assert taken.sent_at >= before
    index, arrived, read, stamped, offset, bound = numpy.frombuffer(records)
    assert (index, stamped, offset, bound) == (3, 1.0, 0.25, 0.001)
    assert before - 1 < arrived <= read and read >= before
    by_fd = {entry[0]: entry[1:] for entry in slow}
    assert set(by_fd) == {declined.fd, unknown.fd, not_fast.fd, closed.fd}
    assert by_fd[declined.fd][0] == known_answer and by_fd[declined.fd][1] > before - 1
    assert by_fd[unknown.fd][0] == unknown_answer and by_fd[unknown.fd][2] == 0
    assert by_fd[not_fast.fd] == (None, None, 0)
    assert by_fd[closed.fd] == (b"", None, 0)
    assert os.read(pairs[3][0].fileno(), 100) == known_answer     # not read by drain


def test_answers_known_not_to_be_taken_are_handed_back_without_ending_the_call(connected_pairs, heldfast):
    """New bytes end a call (the driver learns them first); bytes it learnt are not ours
    (None: a 404, say) come back all in one call: a wave of them costs no call each."""
    from gevent.monkey import get_original
    epoll_class, EPOLLIN = get_original("select", ["epoll", "EPOLLIN"])
    not_ours = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}"
    pairs = connected_pairs(3)
    epoll = epoll_class()
    held = {}
    for client, server in pairs:
        held[client.fileno()] = _Held(client, 3)
        epoll.register(client.fileno(), EPOLLIN)
        server.sendall(not_ours)
    _until_ready(epoll, 3)
    _records, slow, answers, _length, failure = heldfast.drain(epoll.fileno(), 64, held, {not_ours: None}, 0.0)
    assert failure is None
    epoll.close()
    assert answers == 0 and sorted(entry[0] for entry in slow) == sorted(held)
    assert all(entry[1] == not_ours for entry in slow)


class _Refusing(_Held):
    """A held poll one of whose attributes fails: before the ledger moves (its clock), as
    the ledger moves on (its count of fast answers), or after (its next request)."""

    def __init__(self, sock, next_expected, fails):
        self.fails = fails
        super().__init__(sock, next_expected)

    def __getattribute__(self, name):
        if name == object.__getattribute__(self, "fails") and name != "fast_answers":
            raise RuntimeError("no %s" % name)
        return object.__getattribute__(self, name)

    def __setattr__(self, name, value):
        if name == "fast_answers" and getattr(self, "fails", None) == name and hasattr(self, name):
            raise RuntimeError("no %s" % name)
        object.__setattr__(self, name, value)


@pytest.mark.parametrize("fails, moved", [("clock_offset", False), ("fast_answers", True), ("request_head", True)])
def test_an_error_on_one_poll_keeps_every_record_taken_and_names_that_poll(connected_pairs, heldfast, fails, moved):
    """A Python error while handling one held poll stops the call there, and the call
    still returns what it did: the good poll's answer is in the records whether it came
    before or after (then at the next call), a ledger the failing poll moved on keeps its
    record, one it did not move is untouched, and the failure names the failing poll's fd."""
    from gevent.monkey import get_original
    epoll_class, EPOLLIN = get_original("select", ["epoll", "EPOLLIN"])
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    (good_client, good_server), (bad_client, bad_server) = connected_pairs(2)
    good, bad = _Held(good_client, 11), _Refusing(bad_client, 11, fails)
    held = {good.fd: good, bad.fd: bad}
    epoll = epoll_class()
    for client, server in ((good_client, good_server), (bad_client, bad_server)):
        epoll.register(client.fileno(), EPOLLIN)
        server.sendall(answer)
    _until_ready(epoll, 2)
    records, failures = b"", []
    for _call in range(4):
        more_records, slow, _answers, _length, failure = heldfast.drain(epoll.fileno(), 64, held,
                                                                        {answer: (0, 11, 12, 2)}, 0.0)
        records += more_records
        assert slow == []
        if failure is not None:
            failures.append(failure)
            epoll.unregister(failure[0])   # the driver drops that poll
            del held[failure[0]]
        elif not more_records:
            break
    epoll.close()
    assert [(fd, type(error), str(error)) for fd, error in failures] == [(bad.fd, RuntimeError, "no %s" % fails)]
    assert (good.ledger.next_expected, good.fast_answers) == (13, 1)
    assert good_server.recv(100) == b"GET /r?since=12 HTTP/1.1\r\n\r\n"
    assert (bad.ledger.next_expected, bad.ledger.received) == ((13, 2) if moved else (11, 0))
    assert len(numpy.frombuffer(records).reshape(-1, heldfast.FIELDS)) == (2 if moved else 1)


def test_the_driver_drops_the_poll_the_compiled_path_failed_on_and_keeps_what_it_took(start_chattle, monkeypatch):
    """drain() returns a failure beside what it did: the driver hands the records over,
    drops only the named poll (a failed request with its reason, its listener told), and
    the other polls stay held."""
    server = start_chattle()
    event, failures, runs = [], [], []

    class Event:
        def fire(self, **kwargs):
            event.append(kwargs)
    polls = HeldPolls(Event(), answer_deadline=10, log_answers=lambda count, length: None,
                      in_order_run=lambda body: None, on_runs=lambda *args: runs.append(args))
    cursors = {}

    def on_answer(number):
        def take(reply):
            cursors[number] = json.loads(reply.body)["cursor"]
            return cursors[number]
        return take
    held = [polls.hold(LongPollClient(server.url), "/rooms/failed/msgs?since=", None, "&timeout=5", on_answer(n),
                       lambda reason, n=n: failures.append((n, reason)), "/rooms/failed/msgs", "poll (first)")
            for n in range(3)]
    assert _until(lambda: len(cursors) == 3 and len(polls) == 3), failures
    record = numpy.array([[0, 1.0, 1.0, 1.0, 0.0, 0.0]]).tobytes()
    polls._known_bodies.append(b"{}")

    class Failing:
        FIELDS = 6
        calls = 0

        @classmethod
        def drain(cls, *_args):
            cls.calls += 1
            if cls.calls == 1:
                return record, [], 1, 2, (held[1].fd, RuntimeError("failed on purpose"))
            return b"", [], 0, 0, None
    monkeypatch.setattr(longpoll, "_heldfast", Failing)
    assert polls._drain_compiled()
    polls.flush()
    assert failures == [(1, "poll: RuntimeError: failed on purpose")] and len(polls) == 2
    assert [str(fired["exception"]) for fired in event if fired["exception"]] == \
        ["poll: RuntimeError: failed on purpose"]
    assert len(runs) == 1 and runs[0][0] == b"{}" and list(runs[0][1]) == [1.0]   # the record reached on_runs
    for poll in list(polls._held.values()):
        polls.release(poll)


@pytest.mark.parametrize("status, body", [(500, b'{"error": "boom"}'), (200, b"<html>not JSON</html>"),
                                          (200, b'{"messages": 5, "cursor": 3}'), (200, b"[1, 2]")])
def test_a_listener_refuses_an_answer_that_is_not_a_polls_and_its_ledger_stays(status, body):
    """The locustfile's listener raises BadAnswer (HeldPolls then drops that one poll and
    the listener polls again from its cursor): its ledger is where it was."""
    from loadtests.longpoll import BadAnswer, Reply
    listener = _Listener(WorkerTally())
    listener.ledger = DeliveryLedger(2)
    with pytest.raises(BadAnswer):
        listener.on_answer(Reply(status, body, None, time.time(), time.time()))
    assert (listener.ledger.next_expected, listener.ledger.received, listener.polls) == (3, 0, 0)


def test_over_tls_known_answers_are_taken_the_short_way_once_decrypted_with_the_same_figures(
        start_chattle, heldfast, tmp_path, monkeypatch, cannot_run):
    """https:// through nginx: the compiled path is left for the Python one, which takes a
    decrypted known answer as _heldfast.drain takes a plain one (HeldPolls._took_decrypted):
    every ledger, delivery and latency count as without the shortcut, and each answer it
    took is one record."""
    from harness import system_packages
    from harness.proxy import NginxProxy
    from harness.tls import make_certificates
    if system_packages.find("nginx") is None:
        cannot_run(system_packages.missing_line(["nginx"]))
    server = start_chattle()
    certificates = make_certificates(str(tmp_path / "tls"))
    proxy = NginxProxy(server.url, str(tmp_path / "nginx"), certificates=certificates)
    try:
        monkeypatch.setattr(longpoll, "ca_file", certificates.ca)
        python_path, taken_by_python, _none = _fan_out(proxy.url, compiled=False, room="tls-python")
        short_way, taken_short, fast_answers = _fan_out(proxy.url, compiled=True, room="tls-short")
    finally:
        proxy.stop()
    assert python_path["failures"] == [] and python_path["deliveries"] == 40 * 8
    for path in (python_path, short_way):
        assert path.pop("logged_answers") == path.pop("polls")
    assert short_way == python_path
    assert taken_by_python == 0 and taken_short == fast_answers > 0
