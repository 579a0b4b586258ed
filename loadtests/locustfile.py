"""Chattle load scenarios: Listeners hold long-polls on their room for the whole run,
Posters post in bursts; the stages come from loadtests/scenario.py, played by the shape
in loadtests/shapes.py.

Both roles speak through loadtests/longpoll.py: posters through `LongPollClient`, a lean
keep-alive client, listeners through the process's one `HeldPolls`; both read each
answer with the kernel's receive timestamp and report to Locust's request statistics.
Wake-up latency, the client's own lag and delivery completeness are not Locust request
statistics: each worker keeps them in a `WorkerTally` and ships them
to the master in Locust's worker reports; the master adds them up and writes
`<raw-dir>/run.json`. Run it through `make load` (python -m loadtests.run), which starts
the server and sets the options.
"""

import functools
import itertools
import json
import os
import random
import signal
import socket
import struct
import time
import urllib.parse

import gevent
import gevent.event
import locust
from locust import User, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

from chattle_limits import CLIENT_TIMEOUT_MARGIN, client_timeout, collect_garbage_seldom
from instruments.clocks import Clocks, clock_preload, kernel_stamp_skew, monotonic_wait_early
from instruments.httpframe import FramingError
from instruments.measures import DeliveryLedger, process_cpu_seconds
from loadtests import longpoll
from loadtests.locust_stats import log_untimed
from loadtests.longpoll import BadAnswer, HeldPolls, LongPollClient
from loadtests.options import LOCUST, add_to_parser
from loadtests.scenario import room_name, server_urls, stage_at
from loadtests.shapes import StagedShape, SteppedShape  # Locust finds StagedShape here; --shape steps swaps
from loadtests.tally import LOCUST_VERSION, RunTally, WorkerTally

CATCH_UP_POLLS = 50          # answers of up to 1000 messages each, when a listener stops
RETRY_SECONDS = (0.5, 4.0)   # back-off after a failed request: first, longest
SIGNALS_KEPT = 20            # times a listener was told reset or missed, kept per listener

TALLY = WorkerTally()        # this process's figures (on a worker)
RUN = RunTally(locust.__version__)  # the whole run's (on the master)
CLOCKS = Clocks()            # this process's offsets to each server's clock (on a worker)
LOCUST_VERSION[0] = locust.__version__
listener_numbers = itertools.count()
poster_numbers = itertools.count()


class TestClock:
    """When this process's test started: posters read the stage table against it."""
    started = time.time()
    cpu_at_start = 0.0


@events.test_start.add_listener
def remember_start(environment, **_kwargs):
    TestClock.started = time.time()
    TestClock.cpu_at_start = process_cpu_seconds(os.getpid())
    TALLY.test_started()
    if isinstance(environment.runner, WorkerRunner):
        collect_garbage_seldom()
        measure_clocks(environment.parsed_options)
        if environment.parsed_options.receipts:
            gevent.signal_handler(signal.SIGUSR2, functools.partial(vanish_some, environment))


def servers_of(options):
    """The servers listeners spread over and posters take turns on: --servers, else --host."""
    return server_urls(options.servers or options.host)


def measure_clocks(options):
    """Before any listener starts: this process's clock against the kernel's receive stamps
    and against every server's `ts` clock (instruments/clocks.py)."""
    CLOCKS.kernel_skew, CLOCKS.kernel_skew_bound = kernel_stamp_skew()
    longpoll.kernel_stamp_shift = CLOCKS.kernel_skew
    CLOCKS.timed_wait_early, CLOCKS.preload = monotonic_wait_early(), clock_preload()
    try:
        CLOCKS.measure(servers_of(options), lambda url: LongPollClient(url, None, timeout=CLIENT_TIMEOUT_MARGIN))
    except (OSError, FramingError, ValueError) as exc:
        TALLY.error("clock", "offset not measured, latencies uncorrected: %s" % exc)
    TALLY.clocks = CLOCKS.to_dict()


@events.init_command_line_parser.add_listener
def add_options(parser):
    """Every option of loadtests/options.py the locustfile takes, as Locust names it."""
    add_to_parser(parser.add_argument_group("chattle"), LOCUST, locust=True)


def stages_of(options):
    if options.shape == "steps":
        return SteppedShape.table(options)
    return StagedShape.table(options)


# -- Locust, made cheaper where it measurably costs ----------------------------------------------

def cache_default_args():
    """Locust 2.47's worker rebuilds its whole argument parser (default_args_dict) once
    per option of every spawn message, in a dict comprehension, about 3 ms a build: a
    master and a worker in one process spawning 300 users at 10/s built it 1,681 times
    for 7.0 s of CPU, 0.13 s with the cache (2026-12-08, the 2-core development machine).
    The defaults never change in a process, so compute them once.
    Locust has no setting for it; tests/harness/test_locust_internals.py counts the parser builds
    of a real worker spawning users, and fails when the cache no longer holds them to one."""
    from locust import argument_parser
    if not hasattr(argument_parser.default_args_dict, "cache_info"):
        argument_parser.default_args_dict = functools.lru_cache(maxsize=1)(argument_parser.default_args_dict)


cache_default_args()


# -- worker to master ----------------------------------------------------------------------------

TALLY_MESSAGE = "chattle_tally"  # a report sent at once, outside Locust's 3 s ticks


def tally_report():
    if HELD_POLLS:
        HELD_POLLS[0].flush()
    return TALLY.take_report(final=TALLY.live_listeners == 0 and TALLY.listeners_ended > 0)


@events.report_to_master.add_listener
def ship_tally(client_id, data, **_kwargs):
    data["chattle"] = tally_report()


@events.worker_report.add_listener
def add_tally(client_id, data, **_kwargs):
    if "chattle" in data:
        known, fatal = RUN.version_problem, RUN.fatal
        RUN.merge(client_id, data["chattle"])
        if RUN.version_problem and not known:
            print("chattle: " + RUN.version_problem, flush=True)
            StagedShape.request_stop()
        if RUN.fatal and not fatal:
            print("chattle: " + RUN.fatal, flush=True)
            StagedShape.request_stop()


def add_tally_message(environment, msg, **_kwargs):
    add_tally(msg.node_id, msg.data)


def listen_for_tallies(runner):
    """On the master: the reports report_now sends arrive as TALLY_MESSAGE messages
    (Locust's register_message) and are added up as the periodic ones are."""
    if isinstance(runner, MasterRunner):
        runner.register_message(TALLY_MESSAGE, add_tally_message)


def report_now(environment):
    """A report at once, not at the next tick: the master ends the run only once every
    worker is drained. It goes as a custom message (Locust's send_message), in order
    with the worker's other messages; Locust's own request statistics follow in the
    next periodic report or the final one each worker sends when told to quit."""
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        runner.send_message(TALLY_MESSAGE, {"chattle": tally_report()})


@events.test_stop.add_listener
def report_at_stop(environment, **_kwargs):
    """A worker's test_stop comes after every user's on_stop (each listener caught up) and
    before it tells the master it stopped: the last ledgers reach the master first."""
    report_now(environment)


@events.quit.add_listener
def write_run(**_kwargs):
    environment = write_run.environment
    if environment is None or not isinstance(environment.runner, MasterRunner):
        return
    raw_dir = environment.parsed_options.raw_dir
    if raw_dir:
        os.makedirs(raw_dir, exist_ok=True)
        RUN.master = {"host": socket.gethostname(), "pid": os.getpid(),
                      "cpu_seconds": process_cpu_seconds(os.getpid()) - TestClock.cpu_at_start}
        RUN.write(os.path.join(raw_dir, "run.json"))


@events.init.add_listener
def remember_environment(environment, **_kwargs):
    write_run.environment = environment
    StagedShape.run_tally = RUN
    options = environment.parsed_options
    if options is not None:
        longpoll.ca_file = options.ca_file   # https:// servers: checked against it
    if options is not None and options.shape == "steps" and environment.shape_class is not None:
        environment.shape_class = SteppedShape()
        environment.shape_class.runner = environment.runner
    if isinstance(environment.runner, MasterRunner):
        listen_for_tallies(environment.runner)
        gevent.signal_handler(signal.SIGUSR1, StagedShape.request_stop)
        if environment.web_ui is not None:  # make load UI=1
            from loadtests.live_page import extend
            extend(environment, RUN, servers_of(options), StagedShape.request_stop)


write_run.environment = None


# -- the users ------------------------------------------------------------------------------------

class Listener(User):
    """Long-polls one room with its cursor for the whole run and checks every id it gets.

    This process's HeldPolls connects for it, sends its first poll (no since: the
    cursor) and then its held polls, and hands it every answer, until the connection
    fails (the listener retries, backing off) or the run stops it."""

    weight = 1
    wait_time = constant(0)

    def on_start(self):
        options = self.environment.parsed_options
        self.number = next(listener_numbers)
        self.name = "%s-%d" % (os.getpid(), self.number)
        # Locust's stop_users formats every stopped user's greenlet name for a debug line,
        # even with debug logging off, and gevent makes an unnamed greenlet's name through
        # its ident registry: a fifth of the worker's CPU at ramp-down (py-spy). Named
        # here (gevent documents the assignment), that costs nothing and logs read better.
        self.greenlet.name = "listener-" + self.name
        self.room = room_name(self.number % options.rooms)
        servers = servers_of(options)
        self.host = servers[self.number % len(servers)]
        clock = CLOCKS.by_url.get(self.host)
        self.clock_offset, self.clock_bound = (clock.offset, clock.bound) if clock else (0.0, 0.0)
        self.poll_timeout = options.poll_timeout
        self.client = LongPollClient(self.host, self.environment.events.request,
                                     timeout=client_timeout(options.poll_timeout))
        self.ledger = None
        self.polls = 0
        self.gave_up = None
        self.trouble_since = None
        self.retry = RETRY_SECONDS[0]
        self.held = None
        self.signals = []
        self.epoch = None           # the room's history the server named (None: it names none)
        self.receipts = options.receipts
        self.segments = []          # with --receipts: each stay in one history (instruments/judging.py)
        self.vanished = False       # CHAOS=vanished-clients: this one reset its connection and left
        self.gave_up_at = None      # when it stopped listening before the run stopped it
        self.broken = gevent.event.Event()
        self.broken_reason = None
        TALLY.listener_started()
        LIVE_LISTENERS.add(self)

    @property
    def cursor(self):
        """The last id received; None before the first answer (a poll without since) set it."""
        return self.ledger.next_expected - 1 if self.ledger is not None else None

    @task
    def listen(self):
        while self.gave_up is None:
            self.broken.clear()
            try:
                self.held = held_polls(self.environment).hold(
                    self.client, "/rooms/%s/msgs?since=" % self.room, self.cursor, self._after_cursor(),
                    self._answered, self._broke, "/rooms/%s/msgs" % self.room, "poll (first, no since)",
                    self.ledger, (self.clock_offset, self.clock_bound))
            except OSError as exc:
                self._trouble("poll (held): %s" % (exc or type(exc).__name__))
                continue
            self.broken.wait()
            self.polls += self.held.fast_answers
            self.held = None
            if self.vanished:
                break
            self._trouble(self.broken_reason)
        gevent.sleep(3600)  # gave up: stay counted as a user, do nothing, until the run stops it

    def _after_cursor(self):
        """What follows the cursor in a poll: the history's token once the server named one."""
        epoch = "&epoch=%s" % urllib.parse.quote(self.epoch, safe="") if self.epoch is not None else ""
        return "%s&timeout=%g" % (epoch, self.poll_timeout)

    def _took_epoch(self, epoch):
        """An answer named the room's history: send it with every poll from now on (the
        compiled path reads request_tail per send, so the held poll changes at once)."""
        if epoch is None or epoch == self.epoch:
            return
        self.epoch = epoch
        if self.held is not None:
            self.held.request_tail = ("%s HTTP/1.1\r\nHost: %s\r\n\r\n" % (
                self._after_cursor(), self.client.host_header)).encode("latin-1")

    def _segment(self, start, epoch):
        if self.receipts:
            self.segments.append({"epoch": epoch, "start": start, "from": time.time(), "until": None,
                                  "got": [], "missed": []})

    def _answered(self, reply):
        """HeldPolls calls this with each answer; the next poll's cursor, or None to stop.
        An answer that is not a poll's raises BadAnswer: HeldPolls counts that poll as a
        failed request and this listener polls again from its cursor (`_broke`)."""
        if reply.status != 200:
            raise BadAnswer("answered %d: %s" % (reply.status, reply.body[:200].decode("utf-8", "replace")))
        ledger = self.ledger
        if ledger is None:
            # the first answer (no since): where this listener's duty starts
            try:
                ledger = DeliveryLedger(int(json.loads(reply.body)["cursor"]))
            except (ValueError, KeyError, TypeError):
                raise BadAnswer("the first poll (no since) answered without a cursor: %r" % reply.body[:200]) from None
            self.ledger = ledger
            if self.held is not None:
                self.held.ledger = ledger   # from now on the compiled path may move it on
            epoch = ANSWERS.epoch(reply.body)
            self._segment(ledger.start, epoch)
            self._took_epoch(epoch)
            self._in_contact()
            return ledger.next_expected - 1
        # once per answer, 10 000 times per post: kept flat
        try:
            messages, missed, reset = ANSWERS.parse(reply.body)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BadAnswer("a body that is not a poll's answer (%s): %r" % (type(exc).__name__, reply.body[:80])) \
                from None
        if self.trouble_since is not None:
            self._in_contact()
        self.polls += 1
        if reset or missed:
            self._note_missed(missed, reset)
        if reset:
            # The room's history is not what this listener saw (a failover lost its newest
            # posts): it starts over from the server's cursor, as a client drops its view.
            self._reset_to(reply.body)
            return ledger.next_expected - 1
        arrived_at, read_at, stamped = reply.arrived_at, reply.read_at, reply.stamped
        offset, bound = self.clock_offset, self.clock_bound
        got = self.segments[-1]["got"] if self.segments else None
        for message_id, ts in messages:
            ledger.record(message_id)
            TALLY.delivery(arrived_at, read_at, ts, stamped, offset, bound)
            if got is not None:
                got.append([message_id, ts])
        return ledger.next_expected - 1

    def _reset_to(self, body):
        """A `reset` answer: the ledger starts over from its cursor, in the history it names."""
        cursor = json.loads(body)["cursor"]
        if self.segments:
            self.segments[-1]["until"] = time.time()
        self.ledger.rebase(cursor)
        epoch = ANSWERS.epoch(body)
        self._segment(cursor, epoch)
        self._took_epoch(epoch)

    def _in_contact(self):
        self.trouble_since, self.retry = None, RETRY_SECONDS[0]

    def _broke(self, reason):
        self.broken_reason = reason
        self.broken.set()

    def _trouble(self, trouble):
        """Count a failure and back off; after --lost-contact-seconds without one good
        answer the listener gives up, counted apart from messages the server lost."""
        TALLY.error("listener", trouble)
        now = time.time()
        self.trouble_since = self.trouble_since or now
        if now - self.trouble_since >= self.environment.parsed_options.lost_contact_seconds:
            self.gave_up = "lost contact: %s" % trouble
            self.gave_up_at = now
            return
        gevent.sleep(self.retry * random.uniform(0.5, 1.0))
        self.retry = min(RETRY_SECONDS[1], self.retry * 2)

    def _take_caught_up(self, reply):
        """Record one catch-up answer (delivered, without a wake-up latency: nobody was
        waiting any more); how many messages it held."""
        messages, missed, reset = ANSWERS.parse(reply.body)
        self.polls += 1
        if reset or missed:
            self._note_missed(missed, reset)
        if reset:
            self._reset_to(reply.body)
            return 0
        got = self.segments[-1]["got"] if self.segments else None
        for message_id, ts in messages:
            self.ledger.record(message_id)
            if got is not None:
                got.append([message_id, ts])
        return len(messages)

    def _note_missed(self, missed, reset):
        if missed and self.segments:
            self.segments[-1]["missed"].append([time.time(), self.cursor, missed])
        if len(self.signals) < SIGNALS_KEPT:
            self.signals.append(time.time())  # when it was told: posts accepted before are not silent losses
        if reset:
            TALLY.error("listener", "the server answered reset: it lost the room's history")
        self.ledger.missed_reported += missed

    def vanish(self):
        """CHAOS=vanished-clients: reset the held poll's connection without a FIN (SO_LINGER
        0: the close sends RST) and leave for good, as a client whose host vanished."""
        held = self.held
        if held is None or self.gave_up is not None:
            return False
        held.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.vanished = True
        self.gave_up = "vanished (chaos)"
        self.gave_up_at = time.time()
        held_polls(self.environment).release(held)
        self._broke("vanished")
        return True

    def on_stop(self):
        """Stop listening, then settle the account: the room's last id right after this
        listener stopped is where its duty ends (`listened_until`); messages up to it still
        on their way are fetched (timeout=0) and count as delivered, without a wake-up
        latency, since nobody was waiting for them any more."""
        LIVE_LISTENERS.discard(self)
        if self.held is not None:
            self.polls += self.held.fast_answers
            held_polls(self.environment).release(self.held)
        self.client.close()
        caught_up, listened_until, stopped_at = 0, None, time.time()
        if self.ledger is not None and self.gave_up is None:
            try:
                stopped_at = time.time()
                listened_until = ROOM_ENDS.last_id(self.host, self.room)
                catch_up = LongPollClient(self.host, None, timeout=CLIENT_TIMEOUT_MARGIN)
                try:
                    for _ in range(CATCH_UP_POLLS):
                        if self.ledger.next_expected > listened_until:
                            break
                        path = "/rooms/%s/msgs?since=%d%s&timeout=0&limit=1000" % (
                            self.room, self.cursor, "&epoch=%s" % urllib.parse.quote(self.epoch, safe="")
                            if self.epoch is not None else "")
                        reply = catch_up.get(path, name="poll (catch-up)")
                        if reply.status != 200:
                            raise OSError("answered %d" % reply.status)
                        taken = self._take_caught_up(reply)
                        caught_up += taken
                        if not taken:
                            break
                finally:
                    catch_up.close()
            except (OSError, FramingError, ValueError) as exc:
                self.gave_up = "catch-up at stop failed: %s" % (exc or type(exc).__name__)
                TALLY.error("listener", self.gave_up)
        elif self.ledger is None and self.gave_up is None:
            self.gave_up = "stopped before its first answer"
        TALLY.listener_ended({"listener": self.name, "room": self.room,
                              "ledger": self.ledger.to_dict() if self.ledger else None, "polls": self.polls,
                              "caught_up": caught_up, "listened_until": listened_until, "gave_up": self.gave_up,
                              "signals": self.signals, "epoch": self.epoch,
                              "stopped_at": self.gave_up_at or stopped_at,
                              "segments": self.segments if self.receipts else None, "vanished": self.vanished})
        if TALLY.live_listeners == 0:
            gevent.spawn(report_now, self.environment)


class ParsedAnswers:
    """Each distinct answer body, parsed once. A fan-out hands every listener of a room
    byte-identical bodies (the server builds one answer per cursor and shares it), so
    10,000 listeners woken by one post need one json.loads, not 10,000."""

    MAX_BODIES = 256           # distinct bodies kept; cleared when full
    MAX_BODY_BYTES = 65536     # larger bodies (catch-up pages) are parsed and not kept

    def __init__(self):
        self._parsed = {}

    def parse(self, body):
        """((id, ts) of each message, missed, reset) of one answer body."""
        parsed = self._parsed.get(body)
        if parsed is None:
            answer = json.loads(body)
            parsed = (tuple((message["id"], message["ts"]) for message in answer["messages"]),
                      answer.get("missed", 0), bool(answer.get("reset")))
            if len(body) <= self.MAX_BODY_BYTES:
                if len(self._parsed) >= self.MAX_BODIES:
                    self._parsed.clear()
                self._parsed[body] = parsed
        return parsed

    def epoch(self, body):
        """The history token of an answer (None: the server names none). Rare: first
        answers, resets and posts."""
        try:
            epoch = json.loads(body).get("epoch")
        except (ValueError, AttributeError):
            return None
        return str(epoch) if epoch is not None else None

    def run_of(self, body):
        """(first id, last id) when the body holds a run of consecutive ids and says nothing
        else (no missed, no reset): what a listener takes the short way. A poll's timeout
        (no messages) is the empty run (cursor + 1, cursor). Else None."""
        try:
            messages, missed, reset = self.parse(body)
            if not messages:
                cursor = json.loads(body)["cursor"]
                return (cursor + 1, cursor) if isinstance(cursor, int) and not (missed or reset) else None
        except (ValueError, KeyError, TypeError):
            return None
        if missed or reset:
            return None
        first = messages[0][0]
        if not isinstance(first, int) or [message_id for message_id, _ts in messages] != list(
                range(first, first + len(messages))):
            return None
        return first, first + len(messages) - 1


ANSWERS = ParsedAnswers()


def record_runs(body, arrived_at, read_at, stamped, clock_offset, clock_bound):
    """Every delivery of the compiled path's answers of one body (numpy arrays, one value
    per answer), into this process's tally."""
    for _message_id, ts in ANSWERS.parse(body)[0]:
        TALLY.delivery_batch(arrived_at, read_at, ts, stamped, clock_offset, clock_bound)


class RoomEnds:
    """The last id of each room, asked of the server at most every half second per room
    and shared by every listener of this process that stops meanwhile."""

    FRESH_SECONDS = 0.5

    def __init__(self):
        self._known = {}       # room -> (asked at, AsyncResult of the last id)

    def last_id(self, host, room):
        asked = self._known.get(room)
        if asked is not None and time.monotonic() - asked[0] < self.FRESH_SECONDS:
            return asked[1].get(timeout=CLIENT_TIMEOUT_MARGIN)
        result = gevent.event.AsyncResult()
        self._known[room] = (time.monotonic(), result)
        client = LongPollClient(host, None, timeout=CLIENT_TIMEOUT_MARGIN)
        try:
            reply = client.get("/rooms/%s/msgs?limit=1" % room)
            if reply.status != 200:
                raise OSError("the room's last id: answered %d" % reply.status)
            result.set(json.loads(reply.body)["cursor"])
        except (OSError, FramingError, ValueError) as exc:
            self._known.pop(room, None)
            result.set_exception(exc)
            raise
        finally:
            client.close()
        return result.get()


ROOM_ENDS = RoomEnds()
HELD_POLLS = []
LIVE_LISTENERS = set()
VANISH_EVERY = 5             # CHAOS=vanished-clients: one listener in this many vanishes


def vanish_some(environment):
    """SIGUSR2 (CHAOS=vanished-clients, sent by the orchestrator): one listener in
    VANISH_EVERY resets its connection and leaves; how many, and when, goes to
    <raw-dir>/vanished (a line per load process) for the orchestrator's check of /stats."""
    def vanish():
        listeners = sorted(LIVE_LISTENERS, key=lambda listener: listener.number)
        count = sum(1 for listener in listeners[::VANISH_EVERY] if listener.vanish())
        raw_dir = environment.parsed_options.raw_dir
        if raw_dir:
            with open(os.path.join(raw_dir, "vanished"), "a") as out:
                out.write("%d %d %.6f\n" % (os.getpid(), count, time.time()))
    gevent.spawn(vanish)


def driver_died(environment, reason):
    """This process's held-poll driver failed: its listeners cannot hold a poll any more.
    The master hears it in a report sent now, stops the run and its report says why."""
    TALLY.fatal = reason
    TALLY.error("listener", reason)
    print("chattle: %s" % reason, flush=True)
    gevent.spawn(report_now, environment)


def held_polls(environment):
    """This process's HeldPolls (made on first use: it needs the run's options)."""
    if not HELD_POLLS:
        options = environment.parsed_options
        name = "poll (held)"
        # --receipts: every answer through the Python path, which keeps each message's ts;
        # https://: the compiled path frames plain bytes only, the Python path takes known
        # answers the short way after decrypting them (HeldPolls._took_decrypted)
        tls = any(url.startswith("https:") for url in servers_of(options))
        fast = not options.receipts
        HELD_POLLS.append(HeldPolls(environment.events.request, client_timeout(options.poll_timeout), name,
                                    functools.partial(log_untimed, environment.stats, "GET", name),
                                    ANSWERS.run_of if fast else None, record_runs if fast else None,
                                    functools.partial(driver_died, environment)))
        TALLY.held_path = ("receipts" if options.receipts else "tls" if tls and HELD_POLLS[0].shortcut else
                           "compiled" if HELD_POLLS[0].compiled else "python")
    return HELD_POLLS[0]


def refused_post(room, reply):
    """The error a poster records for a post not answered 201. Posters do not retry, so a
    503 of unknown outcome (the post may have been written, and its listeners given it) is
    told apart from a refusal; both name the room, as the failover's time without service counts them."""
    what = "post to %s answered %d" % (room, reply.status)
    return what + ", outcome unknown" if outcome_unknown(reply.status, reply.body) else what


def outcome_unknown(status, body):
    """A 503 whose body says {"outcome": "unknown"}: the server cannot tell whether the post
    was written (counted apart from refusals)."""
    if status != 503:
        return False
    try:
        return json.loads(body).get("outcome") == "unknown"
    except (ValueError, AttributeError):
        return False


class Poster(User):
    """Posts bursts (several messages back to back, then quiet) while a burst stage is on."""

    fixed_count = 1
    wait_time = constant(0)

    def on_start(self):
        options = self.options = self.environment.parsed_options
        self.number = next(poster_numbers)
        self.stages = stages_of(options)
        self.next_room = self.number
        self.burst_step = None
        # one client per server; posts take turns, so every server's posts reach every other's listeners
        self.clients = [LongPollClient(url, self.environment.events.request,
                                       timeout=client_timeout(options.poll_timeout))
                        for url in servers_of(options)]
        self.turns = itertools.cycle(self.clients)
        # Seeded, the gaps (and so the number of posts a run makes) are the same run after
        # run: unseeded, a default run made 30 to 75 posts, and its ratios did not compare.
        seed = options.seed
        self.gaps = random.Random(seed * 1000 + self.number) if seed else random.Random()

    @task
    def burst(self):
        stage = stage_at(self.stages, time.time() - TestClock.started)
        if stage is None or not stage["posting"] or ("step" in stage and stage["step"] == self.burst_step):
            gevent.sleep(0.25)
            return
        self.burst_step = stage.get("step")  # a stepped table: one burst per step
        room = room_name(self.next_room % self.options.rooms)
        self.next_room += 1
        for sequence in range(self.options.burst_size):
            payload = json.dumps({"from": "poster-%d" % self.number, "content": "burst message %d" % sequence})
            try:
                reply = next(self.turns).post("/rooms/%s/msgs" % room, payload.encode(), name="post")
            except (OSError, FramingError) as exc:
                TALLY.error("poster", "post to %s : %s" % (room, exc or type(exc).__name__))
                TALLY.refused(room, None, False)
                continue
            if reply.status != 201:
                TALLY.error("poster", refused_post(room, reply))
                TALLY.refused(room, reply.status, outcome_unknown(reply.status, reply.body))
                continue
            accepted = json.loads(reply.body)
            TALLY.post(room, accepted["id"], accepted["ts"], accepted.get("epoch"))
        # Exponential gaps: bursts from several posters overlap sometimes, as in a real chat.
        gevent.sleep(self.gaps.expovariate(1.0 / self.options.burst_gap))

