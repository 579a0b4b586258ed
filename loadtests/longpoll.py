"""A lean HTTP/1.1 keep-alive client for Locust users, on gevent sockets.

Why not FastHttpUser: profiled with py-spy at 5000 listeners (docs/design.md, "The load
client"), geventhttpclient's request/response objects, header parsing, cookie jar and
Locust's ResponseContextManager cost about 300 us of load-generator CPU per delivery,
three times what the server spends delivering it. A held poll needs none of that:
one request line out, one short answer in, framed by `instruments.httpframe` (the parser
the bench rig uses too).

Every answer is read with recvmsg() and the kernel's receive timestamp
(SO_TIMESTAMPNS), so each `Reply` says when its last byte reached this host
(`arrived_at`) and when this process got round to reading it (`read_at`). The first is
what the server's wake-up latency ends on; the gap is the load generator's own lag.

https:// servers are spoken to over TLS kept in memory (harness.tls.ClientTls): the
socket is still read with recvmsg(), so the stamp is the arrival of the encrypted bytes,
and their decryption falls in the client's lag. The compiled path frames plain bytes
only: over TLS every answer takes the Python path, which takes a known answer the short
way once decrypted (HeldPolls._took_decrypted; docs/measuring.md says what it costs).
The certificate is checked against `ca_file` (the run's own CA, or --ca-file), else the
system's CAs.

Each request fires Locust's `events.request`, as Locust's documentation asks of a
custom client, so its request statistics, failures and CSV stay complete; a fan-out's
held-poll answers reach the same statistics a batch at a time (`HeldPolls.log_answers`).
"""

import _socket
import errno
import functools
import os
import socket
import struct
import time
import urllib.parse

from harness.tls import ClientTls, client_context
from instruments import stamps
from instruments.httpframe import FramingError, ResponseParser
from instruments.stamps import ANCILLARY_SPACE, SO_TIMESTAMPNS

try:
    from loadtests import _heldfast  # the common case compiled: see HeldPolls
except ImportError:
    _heldfast = None
else:
    # its answers come as arrays; imported here, not at the first fan-out (a 0.8 s stall
    # the first wave's client lag showed)
    import numpy
    # numpy.unique imports numpy.ma at its first call, 8 to 30 ms measured: here, not in
    # the first flush, where it showed as the first burst's client lag p99 (about 30 ms
    # against a few ms in the later bursts, 1,000 listeners)
    numpy.unique(numpy.zeros(1))

RECEIVE_SIZE = 65536
# A keep-alive connection idle longer than this is replaced before a request is sent on
# it: a server may close idle connections (Chattle's keep-alive deadline), and a POST
# sent into a connection the server is closing cannot safely be retried.
IDLE_REUSE_SECONDS = 4.0
EPOLLIN = 0x001
EPOLLOUT = 0x004
CONNECT_SECONDS = 10.0   # a held poll's connection not made by then is a failure
# How often the driver looks for held polls past their deadline: a sweep walks every
# held poll, so once a second cost 2 % of the load generator's CPU at 10,000 listeners.
# A deadline of 25 s is then noticed up to 5 s late.
SWEEP_SECONDS = 5.0
YIELD_SECONDS = 0.02
# When a fan-out is on and the driver has read every answer there was, it sleeps this
# long before looking again rather than blocking until the next one: woken per answer,
# the load generator spent more on its own sleeps and wake-ups (a context switch, the
# hub, a greenlet switch: about 30,000 a second) than on reading. The answers wait in
# the kernel meanwhile, stamped on arrival, so the wake-up latency does not move; the
# client lag grows by at most this much.
COALESCE_SECONDS = 0.001
# With nothing to read, the driver waits for the next answer in a thread, blocked on its
# epoll set, at most this long at a time. Not through gevent: a watcher on the epoll
# descriptor puts one epoll set inside libev's, and libev takes it out whenever it turns
# readable while nobody waits (each coalescing sleep) and puts it back at the next wait:
# the kernel walks every held socket on each such EPOLL_CTL_ADD (ep_loop_check), 15 %
# of the load generator's CPU in a fan-out at 5,000 listeners (perf).
IDLE_WAIT_SECONDS = 1.0
# The compiled path's records go to the tally (flush) only after this long without an
# answer: flushed at the first idle moment, between two fan-outs of one burst, they took
# up to 16 ms while the next fan-out's answers waited in the kernel, which showed as the
# client lag's p99 at 1,000 listeners.
FLUSH_QUIET_SECONDS = 0.1
# Answers the compiled path knows by their bytes; the table is cleared when full (a
# fan-out's answers share their bytes within a second, so a few entries serve thousands).
MAX_KNOWN_ANSWERS = 256
# Batches of the compiled path's records kept before they are handed over (see flush).
MAX_BATCHES_KEPT = 1000
# Seconds added to every kernel receive timestamp to put it on this process's wall clock:
# 0 on a real host; instruments/clocks.py measures it (a process under faketime is shifted).
kernel_stamp_shift = 0.0
# The CA https:// servers are checked against ("": the system's); the locustfile sets it.
ca_file = ""


_RESOLVED = {}
# One record of a known answer, as _heldfast.drain writes them (index of its body, arrival,
# read, stamped, clock offset, clock bound): flush reads both alike.
_RECORD = struct.Struct("6d")


def resolve(address):
    """(family, numeric address) of (host, port), looked up once per process."""
    if address not in _RESOLVED:
        family, _type, _proto, _name, numeric = socket.getaddrinfo(address[0], address[1], 0, socket.SOCK_STREAM)[0]
        _RESOLVED[address] = (family, numeric)
    return _RESOLVED[address]


class ConnectionLost(OSError):
    """The server closed the connection, or it broke, before a whole answer arrived."""


class BadAnswer(ValueError):
    """A whole answer that is not what the poll asked for (its status, its body): a
    listener's `on_answer` raises it, and it costs that one poll (HeldPolls)."""


class DriverDied(OSError):
    """The process's held-poll driver stopped on an error of its own: no poll can be held."""


def describe(exc):
    """An exception in one line, its kind first: the reason a failed request is counted under."""
    text = str(exc)
    return "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__


class Reply:
    __slots__ = ("status", "body", "arrived_at", "read_at", "sent_at", "stamped")

    def __init__(self, status, body, arrived_at, read_at, sent_at):
        self.status = status
        self.body = body
        # Kernel receive time of the answer's last segment (wall clock); the read time
        # when the kernel gave none (it turns stamping on in deferred work, so a
        # process's very first answers may come without).
        self.stamped = arrived_at is not None
        self.arrived_at = arrived_at if self.stamped else read_at
        self.read_at = read_at         # when this process read it (wall clock)
        self.sent_at = sent_at


@functools.lru_cache(maxsize=64)
def _address_of(base_url):
    """((host, port), Host header, the name its TLS certificate must carry or None for
    plain http) of a base URL; parsed once per URL, not once per listener at its start
    and again at its stop."""
    parsed = urllib.parse.urlsplit(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError("the long-poll client speaks http://host:port or https://host:port, not %r" % base_url)
    secure = parsed.scheme == "https"
    return (parsed.hostname, parsed.port or (443 if secure else 80)), parsed.netloc, \
        parsed.hostname if secure else None


def new_tls(server_name):
    """A TLS connection's state for a server named `server_name`, or None for plain http."""
    return ClientTls(client_context(ca_file), server_name) if server_name is not None else None


class LongPollClient:
    """One keep-alive connection to `base_url`; `get` and `post` send one request and wait
    for its answer at most `timeout` seconds (a held poll's hold plus a margin)."""

    def __init__(self, base_url, request_event=None, timeout=30.0, connect_timeout=10.0):
        self.address, self.host_header, self.tls_name = _address_of(base_url)
        self.request_event = request_event
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._sock = None
        self._tls = None
        self._parser = None
        self._last_used = 0.0

    # -- the connection ---------------------------------------------------------------

    def _connect(self):
        # Not socket.create_connection: it asks getaddrinfo on every call, and gevent's
        # resolver runs that on a thread pool, once per listener (7 % of a 10k ramp).
        family, address = resolve(self.address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        tls = new_tls(self.tls_name)
        if tls is not None:
            try:
                tls.handshake_blocking(sock)
            except BaseException:
                sock.close()
                raise
        sock.settimeout(self.timeout)
        self._sock, self._tls = sock, tls
        self._parser = ResponseParser()

    def close(self):
        sock, self._sock, self._tls = self._sock, None, None
        if sock is not None:
            sock.close()

    # -- one request ------------------------------------------------------------------

    def get(self, path, name=None):
        return self.request("GET", path, name=name)

    def post(self, path, body, name=None, content_type="application/json"):
        return self.request("POST", path, body, name=name, content_type=content_type)

    def request(self, method, path, body=b"", name=None, content_type=None):
        """Send one request and return its `Reply`; raises OSError (ConnectionLost,
        socket.timeout) or FramingError after firing the request event as a failure."""
        sent_at = time.time()
        try:
            if self._sock is None or sent_at - self._last_used > IDLE_REUSE_SECONDS:
                self.close()
                self._connect()
            head = "%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, path, self.host_header)
            if body:
                head += "Content-Type: %s\r\nContent-Length: %d\r\n" % (content_type, len(body))
            wire = head.encode("latin-1") + b"\r\n" + body
            self._sock.sendall(self._tls.encrypt(wire) if self._tls is not None else wire)
            reply = self._read(sent_at)
        except (OSError, FramingError) as exc:
            self.close()
            self._fire(method, name or path, sent_at, 0, exc)
            raise
        self._last_used = reply.read_at
        self._fire(method, name or path, sent_at, len(reply.body), None)
        return reply

    def _read(self, sent_at):
        sock, parser, tls = self._sock, self._parser, self._tls
        arrived_at = None
        while True:
            data, ancillary, _flags, _address = sock.recvmsg(RECEIVE_SIZE, ANCILLARY_SPACE)
            if data and tls is not None:
                arrived_at = stamps.arrival(ancillary, kernel_stamp_shift) or arrived_at
                data = tls.decrypt(data)
                if data == b"":
                    continue     # a record not yet whole, or one without data
            if not data:
                response = parser.feed_eof()
                if response is None:
                    raise ConnectionLost("the server closed the connection before answering")
            else:
                arrived_at = stamps.arrival(ancillary, kernel_stamp_shift) or arrived_at
                response = parser.feed(data)
                if response is None:
                    continue
            read_at = time.time()
            if not response.keep_alive:
                self.close()
            return Reply(response.status, response.body, arrived_at, read_at, sent_at)

    def _fire(self, method, name, sent_at, length, exception):
        if self.request_event is not None:
            self.request_event.fire(request_type=method, name=name, response_time=(time.time() - sent_at) * 1000.0,
                                    response_length=length, exception=exception, context=None)


# -- every held poll of a process on one epoll set ------------------------------------------

class HeldPolls:
    """The held polls of every listener in this process, driven by one greenlet.

    A greenlet per listener, each blocked in its own recv, cost about 45 us of client
    CPU per delivery here (docs/design.md, "The load client"): every answer meant a
    libev watcher started and stopped, two switches through the hub and a second
    recvmsg. Here a listener hands its keep-alive connection over once; the driver
    waits (cooperatively, through gevent) on one epoll descriptor, and when a fan-out
    makes thousands of sockets readable it reads, hands the answer to its listener's
    callback and sends the next poll for each, without a switch in between. The
    listener's greenlet only waits for its connection to fail, or for the run to stop it.

    One bad answer costs one poll. A malformed or unexpected answer, a reset, a framing
    error or any exception while handling one held poll (its listener's `on_answer`
    included) drops that poll alone: it is fired to `request_event` as a failed request
    with its reason, and its listener's `on_failure` polls again from its cursor, so
    nothing is lost; the other held polls never notice. Should the driver itself fail,
    every held poll fails at once with the reason, `on_driver_death(reason)` is told,
    and `hold` refuses new polls (DriverDied): nobody waits for a driver that is gone.

    The common case, compiled. Even so the Python of that loop was half the load
    generator's CPU in a fan-out (perf: 51 % libpython, 44 % kernel; 13 us per answer).
    When `loadtests._heldfast` is built and the caller says how to take an answer the
    short way, `_heldfast.drain` does it: an answer whose bytes the driver has framed
    before (whole, in one read, 200, keep-alive) and whose body `in_order_run(body)` calls
    a run of ids, for a held poll whose `ledger` (instruments.measures.DeliveryLedger) is at its
    first id, moves that ledger on (DeliveryLedger.record_run's usual case, in C) and the
    next poll asks since its last id; its arrival, read time and clock go to
    `on_runs(body, arrived, read, stamped, clock_offset, clock_bound)` (numpy arrays) a
    batch at a time, and `fast_answers` counts it on the held poll. Everything else takes the Python path, the
    reference: tests/harness/test_load_client.py holds the two to the same figures.
    """

    def __init__(self, request_event=None, answer_deadline=30.0, name="poll (held)", log_answers=None,
                 in_order_run=None, on_runs=None, on_driver_death=None):
        """`request_event` gets each failed poll; `log_answers(count, content_length)`,
        when given, gets the good answers of each batch the driver read, in one call, and
        `request_event` each one otherwise (see `_log_batch`). `in_order_run` and `on_runs`
        turn the compiled path on (see above)."""
        self.request_event = request_event
        self.log_answers = log_answers
        self.answer_deadline = answer_deadline
        self.name = name
        self.in_order_run = in_order_run
        self.on_runs = on_runs
        self.on_driver_death = on_driver_death
        self.failure = None         # why the driver died, once it has
        # known answers taken the short way (see the class): by _heldfast.drain on plain
        # sockets (`compiled`), by _took_decrypted over TLS
        self.shortcut = _heldfast is not None and in_order_run is not None and on_runs is not None
        self.compiled = self.shortcut
        self._decrypted_runs = bytearray()   # the TLS shortcut's records of one drain
        self._epoll = None
        self._held = {}
        self._driver = None
        self._batch_answers = 0
        self._batch_bytes = 0
        self._known = {}            # answer bytes -> (index in _known_bodies, first id, last id, body length)
        self._known_bodies = []
        self._runs = []             # the compiled path's records, not yet handed to on_runs
        self.sweep_seconds = SWEEP_SECONDS

    def __len__(self):
        return len(self._held)

    def hold(self, client, path_to_cursor, cursor, path_after_cursor, on_answer, on_failure,
             first_path=None, first_name=None, ledger=None, clock=(0.0, 0.0)):
        """Poll `path_to_cursor + cursor + path_after_cursor` for `client`'s server. Each
        whole answer goes to `on_answer(reply)`, which returns the next cursor (None: stop
        holding); a failure goes once to `on_failure(reason)`.

        With `cursor` None, the first request is `first_path` (a poll without since, for
        the cursor), fired to Locust as `first_name` with its response time; its answer
        goes to `on_answer` like any other. The connection is this object's: `client`'s
        open one if it has one, else a new one, connected without blocking on the driver's
        epoll set (a gevent socket and its timeouts cost a quarter of the ramp's CPU).
        `ledger` (None until the listener has one: it sets `held.ledger` then) and `clock`
        (the listener's offset to its server's clock and its bound) serve the compiled
        path."""
        import gevent
        if self.failure is not None:
            raise DriverDied(self.failure)
        request_head = ("GET %s" % path_to_cursor).encode("latin-1")
        request_tail = ("%s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path_after_cursor, client.host_header)).encode("latin-1")
        fresh = client._sock is not None and time.time() - client._last_used <= IDLE_REUSE_SECONDS
        if fresh:
            tls = client._tls
            sock = _raw_socket(client._sock)
            client._sock = client._tls = None
        else:
            client.close()
            tls = new_tls(client.tls_name)
            sock = _connecting_socket(client.address)
        if tls is not None:
            self.compiled = False   # it frames plain bytes only (see the module)
        held = HeldPoll(sock, request_head, request_tail, on_answer, on_failure)
        held.tls = tls
        held.ledger = ledger
        held.clock_offset, held.clock_bound = clock
        if cursor is None:
            held.first_name = first_name or first_path
            held.request = ("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (first_path, client.host_header)).encode("latin-1")
        else:
            held.request = held.poll_request(cursor)
        if self._epoll is None:
            # gevent's monkey-patching hides select.epoll; the driver only ever calls it
            # with a zero timeout, after gevent said the epoll descriptor is readable.
            from gevent.monkey import get_original
            self._epoll = get_original("select", "epoll")()
        self._held[held.fd] = held
        if fresh:
            self._epoll.register(held.fd, EPOLLIN)
            self._send_first(held)
        else:
            held.connecting = True
            self._epoll.register(held.fd, EPOLLIN | EPOLLOUT)
        if self._driver is None or self._driver.dead:
            self._driver = gevent.spawn(self._drive)
        return held

    def _connected(self, held):
        """The connect finished (the socket became writable): send the first request."""
        error = held.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._drop(held, "connect: %s" % os.strerror(error))
            return
        held.connecting = False
        self._epoll.modify(held.fd, EPOLLIN)
        if held.tls is not None:
            self._handshake(held, b"")
        else:
            self._send_first(held)

    def _handshake(self, held, received):
        """The TLS handshake, a step per read; the first request once it is done. A
        certificate not trusted costs this poll, with the one line that says so."""
        import ssl
        try:
            done, out = held.tls.handshake(received)
        except ssl.SSLError as exc:
            from harness.tls import refusal_line
            self._drop(held, "connect: " + refusal_line(exc, "%s:%d" % self._address_of_held(held)))
            return
        if out and not held.send_raw(out):
            self._drop(held, "connect: could not send the TLS handshake")
        elif done:
            self._send_first(held)

    @staticmethod
    def _address_of_held(held):
        try:
            return held.sock.getpeername()[:2]
        except OSError:
            return ("?", 0)

    def _send_first(self, held):
        held.sent_at = time.time()
        if not held.send_whole(held.request):
            self._drop(held, "could not send the poll")

    def release(self, held):
        """Stop holding (the listener stops): close without telling the listener. The
        close takes the socket out of the epoll set itself (it is its only descriptor); an
        epoll_ctl first was a tenth of the worker's CPU at ramp-down (py-spy)."""
        self._held.pop(held.fd, None)
        held.close()

    def _unregister(self, held):
        try:
            self._epoll.unregister(held.fd)
        except (OSError, ValueError):
            pass

    def _drop(self, held, reason):
        if self._held.pop(held.fd, None) is not None:
            self._unregister(held)
            held.close()
            self._fire(held, 0, OSError(reason))
            held.on_failure(reason)

    def _fire(self, held, length, exception):
        # No response time: a held poll lasts until the next post, which the scenario's
        # schedule decides, not the server's speed; as a Locust response time it would
        # only drown the real ones (the wake-up latency is measured apart).
        if self.request_event is not None:
            name = held.first_name if held is not None and held.first_name else self.name
            self.request_event.fire(request_type="GET", name=name, response_time=None,
                                    response_length=length, exception=exception, context=None)

    def _fire_first(self, held, response, read_at):
        name, held.first_name = held.first_name, None
        if self.request_event is not None:
            self.request_event.fire(request_type="GET", name=name, response_time=(read_at - held.sent_at) * 1000.0,
                                    response_length=len(response.body), exception=None, context=None)

    def _log_batch(self):
        """The good answers of one batch, to Locust in one call. Fired one by one, the
        request event cost 4 us of the load generator's ~35 us per delivery at 10,000
        listeners (py-spy, docs/design.md "The load client"); the counts Locust keeps are
        the same either way (tests/harness/test_locust_internals.py)."""
        count, self._batch_answers = self._batch_answers, 0
        if count:
            length, self._batch_bytes = self._batch_bytes, 0
            if self.log_answers is not None:
                self.log_answers(count, length)
            elif self.request_event is not None:
                share, rest = divmod(length, count)
                for index in range(count):
                    self._fire(None, share + (index < rest), None)

    def _drive(self):
        import gevent
        try:
            self._drive_while_held()
        except gevent.GreenletExit:
            raise
        except Exception as exc:  # noqa: BLE001  (every held poll is told, and the run is stopped)
            self._died("the held-poll driver died: %s" % describe(exc))

    def _drive_while_held(self):
        import gevent
        from gevent import get_hub
        threads = get_hub().threadpool
        epoll = self._epoll
        sweeper = gevent.spawn(self._sweep_now_and_then)
        yielded = time.monotonic()
        answering = False
        try:
            while self._held:
                if not (self._drain_compiled() if self.compiled else self._drain()):
                    if answering:
                        answering = False
                        gevent.sleep(COALESCE_SECONDS)
                    elif not (self._runs and threads.apply(epoll.poll, (FLUSH_QUIET_SECONDS, 1))):
                        self.flush()
                        threads.apply(epoll.poll, (IDLE_WAIT_SECONDS, 1))
                    yielded = time.monotonic()
                    continue
                answering = True
                self._log_batch()
                if time.monotonic() - yielded > YIELD_SECONDS:
                    # A fan-out keeps answers coming for a second or more: give Locust's
                    # heartbeats, reports and spawning their turn now and then.
                    gevent.sleep(0)
                    yielded = time.monotonic()
        finally:
            sweeper.kill(block=False)
            self.flush()
            self._log_batch()

    def _died(self, reason):
        """The driver (or its sweeper) failed: say why, fail every held poll with the
        reason, and tell `on_driver_death`; from now on `hold` refuses."""
        import traceback
        if self.failure is not None:
            return
        self.failure = reason
        traceback.print_exc()
        for held in list(self._held.values()):
            self._drop(held, reason)
        if self.on_driver_death is not None:
            self.on_driver_death(reason)

    def _contained(self, held, handle, *args):
        """`handle(held, *args)`; an exception costs this held poll only (see the class)."""
        try:
            handle(held, *args)
        except Exception as exc:  # noqa: BLE001  (counted as this poll's failure, with its reason)
            self._drop(held, "poll: %s" % describe(exc))

    def _drain(self):
        """Every ready held poll, the Python way; False when none was ready."""
        events = self._epoll.poll(0, 4096)
        for fd, _events in events:
            held = self._held.get(fd)
            if held is not None:
                self._contained(held, self._connected if held.connecting else self._readable)
        if self._decrypted_runs:
            self._keep_decrypted()
            if len(self._runs) >= MAX_BATCHES_KEPT:
                self.flush()
        return bool(events)

    def _keep_decrypted(self):
        """The TLS shortcut's records of this drain, kept as one batch like _heldfast's."""
        self._runs.append(bytes(self._decrypted_runs))
        self._decrypted_runs.clear()

    def _drain_compiled(self):
        """Every ready held poll, known answers through `_heldfast.drain`, the rest as in
        `_drain`; False when none was ready."""
        records, slow, answers, length, failure = _heldfast.drain(self._epoll.fileno(), 4096, self._held,
                                                                  self._known, kernel_stamp_shift)
        if records:
            self._runs.append(records)
            if len(self._runs) >= MAX_BATCHES_KEPT:
                self.flush()
            self._batch_answers += answers
            self._batch_bytes += length
        for fd, data, arrived_at, problem in slow:
            held = self._held.get(fd)
            if held is None:
                continue
            if problem == -1:
                self._drop(held, "could not send the next poll")
            elif problem:
                self._drop(held, "poll: %s" % OSError(problem, os.strerror(problem)))
            elif data is None:
                self._contained(held, self._connected if held.connecting else self._readable)
            elif not data:
                self._drop(held, "poll: the server closed the connection")
            else:
                self._contained(held, self._took, data, arrived_at)
        if failure is not None:
            # what the call did before it stopped is in records and slow, handled above
            fd, exc = failure
            held = self._held.get(fd)
            if held is not None:
                self._drop(held, "poll: %s" % describe(exc))
        return bool(records or slow or failure)

    def _learn(self, data, response):
        """Remember an answer read whole in one piece for the compiled path: to take it when
        it is one it may (200, keep-alive, a run of ids by `in_order_run`), else to hand it
        straight back (None) without ending its call."""
        if len(data) > RECEIVE_SIZE or data in self._known:
            return
        if len(self._known) >= MAX_KNOWN_ANSWERS:
            self.flush()           # its records name bodies by their place in the table
            self._known.clear()
            self._known_bodies.clear()
        run = self.in_order_run(response.body) if response.status == 200 and response.keep_alive else None
        if run is None:
            self._known[data] = None
            return
        self._known[data] = (len(self._known_bodies), run[0], run[1], len(response.body))
        self._known_bodies.append(response.body)

    def flush(self):
        """The compiled path's answers since the last flush, to `on_runs`, body by body: when
        the driver has nothing to read, and before anyone reads the figures (a worker's
        report). Not after every batch: numpy's cost is per call, and a fan-out read in
        batches of tens spent a tenth of the load generator's CPU in it."""
        if self._decrypted_runs:
            self._keep_decrypted()
        if not self._runs:
            return
        records = numpy.frombuffer(b"".join(self._runs)).reshape(-1, _heldfast.FIELDS)
        self._runs = []
        indices = records[:, 0].astype(numpy.int64)
        for index in numpy.unique(indices).tolist():
            rows = records[indices == index]
            self.on_runs(self._known_bodies[index], rows[:, 1], rows[:, 2], rows[:, 3] != 0, rows[:, 4], rows[:, 5])

    def _sweep_now_and_then(self):
        import gevent
        try:
            while self._held:
                gevent.sleep(self.sweep_seconds)
                self._sweep()
        except gevent.GreenletExit:
            raise
        except Exception as exc:  # noqa: BLE001  (a sweeper gone would leave late polls held for ever)
            self._died("the held-poll sweeper died: %s" % describe(exc))

    def _readable(self, held):
        try:
            data, ancillary, _flags, _address = held.sock.recvmsg(RECEIVE_SIZE, ANCILLARY_SPACE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop(held, "poll: %s" % exc)
            return
        if not data:
            self._drop(held, "poll: the server closed the connection")
            return
        if held.tls is not None:
            if not held.tls.done:
                self._handshake(held, data)
                return
            arrived_at = stamps.arrival(ancillary, kernel_stamp_shift)
            if arrived_at is not None:
                held.arrived_at = arrived_at
            data = held.tls.decrypt(data)
            if data is None:
                self._drop(held, "poll: the server closed the TLS session")
            elif data and not (held.fast and self._took_decrypted(held, data)):
                self._took(held, data, None)
            return
        self._took(held, data, stamps.arrival(ancillary, kernel_stamp_shift))

    def _took_decrypted(self, held, plain):
        """What _heldfast.drain does for a plain socket, for a TLS one's decrypted bytes: a
        known answer for a ledger at its first id moves the ledger on, is recorded for
        `on_runs` and the next poll goes out; no Reply, no framing, no listener call. False
        when it is not such an answer (the caller then takes the usual way)."""
        known = self._known.get(plain)
        ledger = held.ledger
        if known is None or ledger is None or ledger.next_expected != known[1]:
            return False
        index, first, last, length = known
        read_at = time.time()
        stamped = held.arrived_at is not None
        ledger.received += last - first + 1
        ledger.next_expected = last + 1
        held.fast_answers += 1
        self._decrypted_runs += _RECORD.pack(index, held.arrived_at if stamped else read_at, read_at,
                                             1.0 if stamped else 0.0, held.clock_offset, held.clock_bound)
        held.arrived_at = None
        self._batch_answers += 1
        self._batch_bytes += length
        if not held.send(last):
            self._drop(held, "could not send the next poll")
        return True

    def _took(self, held, data, arrived_at):
        """Bytes read from a held poll (`arrived_at`: their kernel stamp, or None): frame
        them, hand each whole answer to its listener, send the next poll."""
        if arrived_at is not None:
            held.arrived_at = arrived_at
        whole = self.shortcut and not held.parser.pending
        try:
            response = held.parser.feed(data)
        except FramingError as exc:
            self._drop(held, "poll: %s" % exc)
            return
        if whole and response is not None and not held.parser.pending:
            self._learn(data, response)
        while response is not None:
            read_at = time.time()
            reply = Reply(response.status, response.body, held.arrived_at, read_at, held.sent_at)
            held.arrived_at = None
            cursor = held.on_answer(reply)   # raises BadAnswer (or worse): _contained drops this poll
            if held.first_name is None:
                self._batch_answers += 1
                self._batch_bytes += len(response.body)
            else:
                self._fire_first(held, response, read_at)
            if cursor is None or not response.keep_alive:
                self.release(held)
                if cursor is not None:
                    held.on_failure("poll: the server closed the connection after its answer")
                return
            if not held.send(cursor):
                self._drop(held, "could not send the next poll")
                return
            response = held.parser.feed(b"") if held.parser._buffer else None
        held.fast = self.shortcut and held.first_name is None and held.ledger is not None and not held.parser.pending

    def _sweep(self):
        """A poll unanswered past its deadline is a failure (the server never answered),
        and so is a connection not made within CONNECT_SECONDS."""
        now = time.time()
        late, slow = now - self.answer_deadline, now - CONNECT_SECONDS
        for held in [held for held in self._held.values() if held.sent_at < late]:
            self._drop(held, "poll: no answer within %gs" % self.answer_deadline)
        for held in [held for held in self._held.values() if held.connecting and held.sent_at < slow]:
            self._drop(held, "connect: not made within %gs" % CONNECT_SECONDS)


class HeldPoll:
    __slots__ = ("sock", "fd", "request_head", "request_tail", "parser", "on_answer", "on_failure", "sent_at",
                 "arrived_at", "connecting", "request", "first_name", "fast", "ledger", "fast_answers", "clock_offset",
                 "clock_bound", "tls")

    def __init__(self, sock, request_head, request_tail, on_answer, on_failure):
        self.sock = sock
        self.fd = sock.fileno()
        self.request_head = request_head
        self.request_tail = request_tail
        self.parser = ResponseParser()
        self.on_answer = on_answer
        self.on_failure = on_failure
        self.sent_at = time.time()
        self.arrived_at = None
        self.connecting = False
        self.request = None         # the first request, sent once connected
        self.first_name = None      # set while the first request (no since) is out
        self.fast = False           # the compiled path may read it (HeldPolls._took decides)
        self.ledger = None          # the listener's DeliveryLedger, moved on by the compiled path
        self.fast_answers = 0       # answers the compiled path took
        self.clock_offset = self.clock_bound = 0.0
        self.tls = None             # a ClientTls for an https:// server

    def poll_request(self, cursor):
        return b"%s%d%s" % (self.request_head, cursor, self.request_tail)

    def send(self, cursor):
        """The next poll; False when it could not go out whole at once (a full send
        buffer for a request of a hundred bytes means the connection is in trouble)."""
        request = b"%s%d%s" % (self.request_head, cursor, self.request_tail)
        self.sent_at = time.time()
        return self.send_whole(request)

    def send_whole(self, request):
        """Send `request` (encrypted over TLS); False unless it went out whole at once."""
        return self.send_raw(self.tls.encrypt(request) if self.tls is not None else request)

    def send_raw(self, data):
        try:
            return self.sock.send(data) == len(data)
        except OSError:
            return False

    def close(self):
        self.sock.close()


def _connecting_socket(address):
    """A plain non-blocking socket whose connect to `address` ((host, port)) has begun;
    the driver learns it finished when the socket turns writable."""
    family, numeric = resolve(address)
    sock = _socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        error = sock.connect_ex(numeric)
        if error not in (0, errno.EINPROGRESS):
            raise OSError(error, "connect: %s" % os.strerror(error))
    except BaseException:
        sock.close()
        raise
    return sock


def _raw_socket(gevent_sock):
    """The same connection as a plain non-blocking socket: the driver reads it directly,
    never through gevent's per-socket waiting."""
    raw = _socket.socket(fileno=gevent_sock.detach())
    raw.setblocking(False)
    return raw
