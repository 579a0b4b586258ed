"""A connection's input, read by chattle's HTTP layer (chattle_http.py): its request heads
read under deadlines (RequestReader, with a server's Deadlines), parsed strictly
(RequestHeaders) and their body framing checked (body_length). What breaks a limit or the
grammar is Refused, which the handler answers as JSON and closes.

Imports gevent and nothing that patches: gunicorn's master imports this (through
chattle_http) unpatched.
"""

import math
import re
import socket
import struct
import time

import gevent


class Refused(Exception):
    """A request this layer answers itself, with `status` and a JSON error, then closes."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


###############################################################################
# Deadlines: one timer per tick of due times, shared by every connection due in it
###############################################################################

_unsent_bytes = 0      # of the answers held for clients still taking them, over every server
_unsent_dropped = 0    # connections dropped to keep a server's within its max_unsent_bytes


def unsent_bytes():
    """Bytes of the answers this process holds for clients still taking them (each server
    bounds its own by max_unsent_bytes)."""
    return _unsent_bytes


def unsent_dropped():
    return _unsent_dropped


class Deadlines:
    """The connections of a server that are waiting on their client with a deadline: for
    a request head, between keep-alive requests, or for an answer to be taken.

    As chattle's Wakeup does for held polls, connections due in the same TICK share one
    bucket and one event-loop timer; nothing runs for them until it fires. A connection
    is only put in a bucket when it is about to block: a head already received, or an
    answer that fits the send buffer (nearly every one), costs no bucket and no timer;
    and a held poll, which waits on its room and not on its client, has no deadline.
    When a bucket's timer fires, each connection still in it is shut down (see
    RequestReader.expire): the greenlet blocked on it wakes to an error or end of stream
    and ends as if the client had gone."""

    __slots__ = ("limits", "by_tick", "holding", "held", "unsent_bytes")

    TICK = 0.25  # seconds: a deadline is enforced at most this late

    def __init__(self, limits):
        self.limits = limits
        self.by_tick = {}  # tick number -> (set of RequestReader, its timer)
        # The answers connections hold while their clients take them, bounded in bytes.
        self.holding = {}  # RequestReader -> id of the answer it holds, longest held first
        self.held = {}     # id of an answer -> [its bytes, connections holding it]
        self.unsent_bytes = 0  # bytes of the answers held, each counted once however many hold it

    def watch(self, reader):
        """Enforce `reader.until` (monotonic) from now on."""
        tick = math.ceil(reader.until / self.TICK)
        if tick == reader.tick:
            return
        if reader.tick:
            self.unwatch(reader)
        entry = self.by_tick.get(tick)
        if entry is None:
            timer = gevent.get_hub().loop.timer(max(0.0, tick * self.TICK - time.monotonic()))
            entry = self.by_tick[tick] = (set(), timer)
            timer.start(self._expire, tick)
        entry[0].add(reader)
        reader.tick = tick

    def unwatch(self, reader):
        entry = self.by_tick.get(reader.tick)
        if entry is not None:
            readers, timer = entry
            readers.discard(reader)
            if not readers:
                # a burst of connections grew this set; nothing should keep it until its tick
                del self.by_tick[reader.tick]
                timer.close()
        reader.tick = 0

    def _expire(self, tick):
        readers, timer = self.by_tick.pop(tick, ((), None))
        if timer is not None:
            timer.close()
        for reader in readers:
            reader.tick = 0
            reader.expire()

    def watched(self):
        return sum(len(readers) for readers, _timer in self.by_tick.values())

    def hold(self, reader, answer):
        """`reader` holds `answer` (bytes) until its client has taken it. Counted whole (what
        is still to send keeps all of it alive), and once however many connections share it
        (a fan-out's answer). Past max_unsent_bytes, the connections that have held theirs
        longest are dropped until the new answer fits; one bigger than the bound alone is
        dropped itself. A slow reader's client polls again from the same cursor."""
        global _unsent_bytes, _unsent_dropped
        key = id(answer)  # the connection references the answer while it is counted: ids are unique
        entry = self.held.get(key)
        if entry is None:
            size, bound = len(answer), self.limits.max_unsent_bytes
            if size > bound:
                _unsent_dropped += 1
                reader.expire()
                return
            for other in list(self.holding):
                if self.unsent_bytes + size <= bound:
                    break
                _unsent_dropped += 1
                self.release(other)
                other.expire()
            entry = self.held[key] = [size, 0]
            self.unsent_bytes += size
            _unsent_bytes += size
        entry[1] += 1
        self.holding[reader] = key

    def release(self, reader):
        global _unsent_bytes
        key = self.holding.pop(reader, None)
        if key is None:
            return
        entry = self.held[key]
        entry[1] -= 1
        if not entry[1]:
            del self.held[key]
            # A dropped connection's greenlet lets go of it on its next turn: counted free now,
            # so that one new answer does not drop more connections than it needs.
            self.unsent_bytes -= entry[0]
            _unsent_bytes -= entry[0]


###############################################################################
# RequestReader: a connection's input, and its deadlines
###############################################################################

READ_BUFFER_BYTES = 1024
# Shuts a connection down at once, discarding what the kernel still holds for it.
_LINGER_NONE = struct.pack("ii", 1, 0)


class RequestReader:
    """A connection's request reader that keeps no buffer while nothing is pending, and
    enforces the connection's deadlines while it waits on its client.

    pywsgi reads requests through a buffered file over the socket; its buffer (and a
    SocketIO that counts itself as a reference to the socket, so that closing it ran
    gevent's socket close path a second time) lived as long as the connection, through
    the whole held poll. Here the bytes received and not yet consumed are all it holds:
    once a request is read, nothing. `read_head` reads a whole request head under its
    limits; `readline` and `read` offer what pywsgi's body reader (Input) asks of its
    rfile. Reads and writes go to the socket's own non-blocking descriptor first, and
    only a read or write that would block is given to gevent, with its deadline.

    `until` is the deadline of what the connection waits for now (None: none, as while
    the application holds a poll or reads a body under its own timeout)."""

    __slots__ = ("sock", "pending", "closed", "deadlines", "until", "head_from", "tick", "sending", "expired")

    def __init__(self, sock, deadlines=None):
        self.sock = sock
        self.pending = b""
        self.closed = False
        self.deadlines = deadlines
        self.tick = 0           # the deadline bucket it is in; 0: none
        self.sending = self.expired = False
        self.head_from = None   # when the head clock started: the first byte, or the previous answer
        self.until = None if deadlines is None else time.monotonic() + deadlines.limits.keepalive_timeout

    def _more(self):
        try:
            data = self.sock._sock.recv(READ_BUFFER_BYTES)
        except BlockingIOError:
            if self.until is not None:
                self.deadlines.watch(self)
            data = self.sock.recv(READ_BUFFER_BYTES)
        self.pending += data
        return data

    def read_head(self, max_bytes, max_line_bytes=None):
        """The request line and headers, without the line break and blank line that end them;
        b"" when the connection ends (or idles out) before a request starts. Raises
        Refused when the head is over `max_bytes` or its request line over `max_line_bytes`,
        or when it ends or times out half-way."""
        try:
            searched = 0
            while True:
                pending = self.pending.lstrip(b"\r\n")  # blank lines between requests are allowed
                if self.head_from is None and pending and self.deadlines is not None:
                    # the first byte of the connection starts the head clock
                    self.head_from = time.monotonic()
                    self.until = self.head_from + self.deadlines.limits.head_timeout
                    if self.tick:
                        self.deadlines.watch(self)
                crlf, lf = pending.find(b"\n\r\n", searched), pending.find(b"\n\n", searched)
                if crlf >= 0 or lf >= 0:
                    end, skip = (lf, 2) if crlf < 0 or 0 <= lf < crlf else (crlf, 3)
                    if end + 1 > max_bytes:
                        raise self._too_large(pending, max_bytes)
                    if max_line_bytes is not None and self._line_too_long(pending, max_line_bytes):
                        raise Refused(414, "the request line is over the %d byte limit" % max_line_bytes)
                    self.pending = pending[end + skip:]
                    return pending[:end]
                if len(pending) > max_bytes:
                    raise self._too_large(pending, max_bytes)
                if max_line_bytes is not None and self._line_too_long(pending, max_line_bytes):
                    raise Refused(414, "the request line is over the %d byte limit" % max_line_bytes)
                self.pending = pending
                searched = max(0, len(pending) - 2)
                if not self._more():
                    if not self.pending.strip(b"\r\n"):
                        return b""
                    if self.expired:
                        raise Refused(408, "the request head did not arrive in time; send it within %g seconds"
                                      % self.deadlines.limits.head_timeout)
                    raise Refused(400, "the connection ended inside the request head")
        finally:
            if self.tick:
                self.deadlines.unwatch(self)
            self.until = self.head_from = None  # a held poll keeps neither

    @staticmethod
    def _line_too_long(pending, max_line_bytes):
        # searches no further than the limit: a long line costs no more than a short one
        end = pending.find(b"\n", 0, max_line_bytes + 2)
        if end < 0:
            return len(pending) > max_line_bytes + 1
        return end - (pending[end - 1:end] == b"\r") > max_line_bytes

    @staticmethod
    def _too_large(pending, max_bytes):
        if pending.find(b"\n", 0, max_bytes) < 0:
            return Refused(414, "the request line is over the %d byte limit" % max_bytes)
        return Refused(431, "the request head is over the %d byte limit" % max_bytes)

    def readline(self, limit=-1):
        while True:
            pending = self.pending
            end = pending.find(b"\n") + 1
            if 0 < limit < (end or len(pending) + 1):
                end = limit  # the caller's cap falls before the newline (or what there is)
            if end or not self._more():
                end = end or len(self.pending)
                line, self.pending = self.pending[:end], self.pending[end:]
                return line

    def read(self, size=-1):
        while size < 0 or len(self.pending) < size:
            if not self._more():
                break
        if size < 0:
            size = len(self.pending)
        data, self.pending = self.pending[:size], self.pending[size:]
        return data

    def send(self, data, body=b""):
        """Send all of `data`, then `body`, in one call (a head and the body it frames are not
        joined: that copied each answer once per connection, and the copy was held as long as
        its client took to read it); what the send buffer does not take at once must be taken
        by the client within the send deadline."""
        try:
            sent = self.sock._sock.sendmsg((data, body)) if body else self.sock._sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data) + len(body):
            self._send_rest(data, body, sent)

    def _send_rest(self, data, body, sent):
        answer = body or data  # the head of a body is one of ok_json_heads', shared and small
        if self.deadlines is not None:
            self.until = time.monotonic() + self.deadlines.limits.send_timeout
            self.sending = True
            self.deadlines.watch(self)
            self.deadlines.hold(self, answer)
        try:
            # once the deadline, or the bound on held answers, shuts the socket down: EPIPE
            if sent < len(data):
                self.sock.sendall(memoryview(data)[sent:])
                sent = len(data)
            if body:
                self.sock.sendall(memoryview(body)[sent - len(data):])
        finally:
            if self.tick:
                self.deadlines.unwatch(self)
            if self.deadlines is not None:
                self.deadlines.release(self)
            self.sending, self.until = False, None

    def expect_request(self, previous_answer):
        """Between keep-alive requests: the next head must be complete within the head
        deadline of the previous answer, and cannot be if it has not begun by the
        keep-alive deadline; so the shorter of the two, from the previous answer."""
        self.head_from = previous_answer
        self.until = previous_answer + min(self.deadlines.limits.keepalive_timeout,
                                           self.deadlines.limits.head_timeout)

    def expire(self):
        """The deadline passed: wake the greenlet blocked on this connection. A reader
        sees the end of the stream (and can still answer 408); a writer gets EPIPE, and
        what the kernel holds for the client is discarded with the connection."""
        self.expired = True
        raw = getattr(self.sock, "_sock", None)
        try:
            if self.sending:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NONE)
                raw.shutdown(socket.SHUT_RDWR)
            else:
                raw.shutdown(socket.SHUT_RD)
        except (OSError, AttributeError):
            pass  # already closed

    def close(self):
        self.closed = True
        self.pending = b""
        if self.tick:
            self.deadlines.unwatch(self)


###############################################################################
# RequestHeaders: the head, parsed strictly
###############################################################################

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HTTP_VERSION = re.compile(r"HTTP/[0-9]\.[0-9]")
_DIGITS = re.compile(r"[0-9]{1,18}")


class RequestHeaders:
    """A request head parsed strictly: the request line's three words, and the header
    fields in arrival order. Anything a lenient parser would guess at (a line that is not
    `Name: value`, a folded line, a control character in a value) is refused with 400,
    since two parsers that guess differently (a proxy's and this one) can be made to see
    two different requests. Offers what pywsgi's and gunicorn's access logs ask of it."""

    __slots__ = ("command", "target", "version", "fields")

    def __init__(self, head, max_headers):
        lines = head.decode("latin-1").split("\n")
        if len(lines) - 1 > max_headers:
            raise Refused(431, "%d request headers are over the limit of %d" % (len(lines) - 1, max_headers))
        words = lines[0].rstrip("\r").split(" ")
        if len(words) != 3 or not _TOKEN.fullmatch(words[0]) or not words[1]:
            raise Refused(400, "the request line %r is not 'METHOD /path HTTP/1.1'" % lines[0][:100])
        self.command, self.target, self.version = words
        if self.version not in ("HTTP/1.1", "HTTP/1.0"):
            if _HTTP_VERSION.fullmatch(self.version):
                raise Refused(505, "HTTP version %s is not supported; use HTTP/1.1" % self.version)
            raise Refused(400, "the request line ends in %r, not an HTTP version" % self.version[:20])
        if self.target[0] != "/":
            raise Refused(400, "the request target must be a path starting with '/'")
        fields = self.fields = []
        for line in lines[1:]:
            line = line[:-1] if line[-1:] == "\r" else line
            name, colon, value = line.partition(":")
            if not colon or not _TOKEN.fullmatch(name):
                raise Refused(400, "the header line %r is not 'Name: value'" % line[:100])
            value = value.strip(" \t")
            if "\r" in value or "\x00" in value:
                raise Refused(400, "the header %s holds a control character" % name[:100])
            fields.append((name, value))

    def items(self):
        return list(self.fields)

    def get(self, name, default=None):
        name = name.lower()
        for field_name, value in self.fields:
            if field_name.lower() == name:
                return value
        return default

    getheader = get

    @property
    def headers(self):
        return ["%s: %s\r\n" % field for field in self.fields]


def body_length(content_length, transfer_encoding):
    """The body's framing from its (comma-joined) headers: (length or None, chunked)."""
    if transfer_encoding is not None:
        if transfer_encoding.lower() != "chunked":
            raise Refused(400, "Transfer-Encoding %r is not supported; send 'chunked' or a Content-Length"
                          % transfer_encoding[:100])
        if content_length is not None:
            raise Refused(400, "a request may not carry both Transfer-Encoding and Content-Length")
        return None, True
    if content_length is None:
        return None, False
    lengths = {part.strip(" \t") for part in content_length.split(",")}
    if len(lengths) != 1:
        raise Refused(400, "conflicting Content-Length values %r" % content_length[:100])
    length = lengths.pop()
    if not _DIGITS.fullmatch(length):
        raise Refused(400, "Content-Length %r is not a byte count" % length[:40])
    return int(length), False
