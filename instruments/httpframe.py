"""Cutting HTTP/1.1 answers out of a byte stream: the one framing parser of the harness.

The bench rig (raw sockets in an epoll set) and the load test's long-poll client (gevent
sockets held open with keep-alive) both read answers through `ResponseParser`, so both
instruments agree on where an answer ends. It frames by Content-Length (every answer
Chattle sends), chunked transfer coding, or the connection's close, and keeps whatever
arrives after one answer for the next (pipelining, keep-alive).

    parser = ResponseParser()
    answer = parser.feed(data)       # None until a whole answer is in
    answer.status, answer.body, answer.keep_alive

No HTTP library: the harness must cost far less than the server it measures, and a
long-poll answer is one short segment, so the common path is one find() and one slice.
"""

import re

HEAD_END = b"\r\n\r\n"
MAX_HEAD = 64 * 1024          # a head longer than this is not a server we can measure
CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)
CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[^\r\n]*close", re.IGNORECASE)


# A fan-out's answers share one head (same status, type and length): frame each distinct
# head once. Bounded, and cleared when full.
_FRAMINGS = {}
MAX_FRAMINGS_KEPT = 256

# More than the head: a fan-out's answers are byte for byte the same (one body shared by
# every waiter of a room, the same Date within a second), and each comes in one segment.
# A whole answer read in one piece is framed once and its Response handed to every
# reader of the same bytes (Responses are never changed). Bounded, cleared when full.
_WHOLE_ANSWERS = {}
MAX_WHOLE_ANSWERS_KEPT = 256
MAX_WHOLE_ANSWER_BYTES = 16384


def frame(head):
    """(status, keep_alive, chunked, content length or None, until_close) of one answer head."""
    if not head.startswith(b"HTTP/1.") or len(head) < 12:
        raise FramingError("not an HTTP/1.x status line: %r" % head[:40])
    try:
        status = int(head[9:12])
    except ValueError:
        raise FramingError("a status line without a status: %r" % head[:40]) from None
    lower = head.lower()
    keep_alive = not head.startswith(b"HTTP/1.0")
    if b"\r\nconnection:" in lower and CONNECTION_CLOSE.search(head):
        keep_alive = False
    if b"\r\ntransfer-encoding:" in lower and CHUNKED.search(head):
        return status, keep_alive, True, None, False
    start = lower.find(b"\r\ncontent-length:")
    if start >= 0:
        value = head[start + 17:lower.index(b"\r\n", start + 2)].strip()
        if not value.isdigit():
            raise FramingError("a Content-Length that is not a number: %r" % value[:20])
        return status, keep_alive, False, int(value), False
    if status in (204, 304) or 100 <= status < 200:
        return status, keep_alive, False, 0, False
    return status, False, False, None, True


class FramingError(ValueError):
    """The bytes are not an HTTP/1.x answer this parser can frame."""


class Response:
    __slots__ = ("status", "head", "body", "keep_alive")

    def __init__(self, status, head, body, keep_alive):
        self.status = status
        self.head = head
        self.body = body
        self.keep_alive = keep_alive

    def header(self, name):
        """The value of the first header called `name` (case-insensitive), or None."""
        match = re.search(rb"\r\n" + re.escape(name.encode()) + rb":[ \t]*([^\r\n]*)", self.head, re.IGNORECASE)
        return match.group(1).decode("latin-1").strip() if match else None


class ResponseParser:
    """Feeds on bytes, hands out one whole `Response` at a time, keeps the rest."""

    __slots__ = ("_buffer", "_head", "_status", "_length", "_chunks", "_keep_alive", "_until_close")

    def __init__(self):
        self._buffer = b""
        self._reset()

    def _reset(self):
        self._head = None
        self._status = None
        self._length = None          # Content-Length framing
        self._chunks = None          # chunked framing: the body pieces decoded so far
        self._keep_alive = True
        self._until_close = False    # neither: the body ends when the server closes

    @property
    def pending(self):
        """True while part of an answer (or of the next one) is buffered."""
        return bool(self._buffer) or self._head is not None

    @property
    def buffered(self):
        """The bytes kept after the last whole answer: what the next one is made of so far
        (less its head, once that is framed)."""
        return self._buffer

    def feed(self, data):
        """Add bytes; the next whole answer, or None while it is incomplete."""
        if self._buffer or self._head is not None:
            return self._feed(data)
        response = _WHOLE_ANSWERS.get(data)
        if response is not None:
            return response
        response = self._feed(data)
        if response is not None and not self._buffer and len(data) <= MAX_WHOLE_ANSWER_BYTES:
            if len(_WHOLE_ANSWERS) >= MAX_WHOLE_ANSWERS_KEPT:
                _WHOLE_ANSWERS.clear()
            _WHOLE_ANSWERS[data] = response
        return response

    def _feed(self, data):
        buffer = self._buffer = self._buffer + data if self._buffer else data
        if self._head is None:
            end = buffer.find(HEAD_END)
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    raise FramingError("an answer head longer than %d bytes" % MAX_HEAD)
                return None
            self._start(buffer[:end + 2])  # keep the head's last CRLF so every header line ends alike
            buffer = self._buffer = buffer[end + 4:]
        if self._length is not None:
            if len(buffer) < self._length:
                return None
            body, self._buffer = buffer[:self._length], buffer[self._length:]
            return self._finish(body)
        if self._chunks is not None:
            return self._feed_chunks()
        return None  # close-delimited: feed_eof() ends it

    def feed_eof(self):
        """The server closed: the close-delimited answer, if one was being read."""
        if self._head is not None and self._until_close:
            body, self._buffer = self._buffer, b""
            return self._finish(body, keep_alive=False)
        if self.pending:
            raise FramingError("the connection closed in the middle of an answer")
        return None

    def _start(self, head):
        framing = _FRAMINGS.get(head)
        if framing is None:
            framing = frame(head)
            if len(_FRAMINGS) >= MAX_FRAMINGS_KEPT:
                _FRAMINGS.clear()
            _FRAMINGS[head] = framing
        self._head = head
        self._status, self._keep_alive, chunked, self._length, self._until_close = framing
        if chunked:
            self._chunks = []

    def _feed_chunks(self):
        buffer = self._buffer
        while True:
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                self._buffer = buffer
                return None
            try:
                size = int(buffer[:line_end].split(b";", 1)[0], 16)
            except ValueError:
                raise FramingError("a bad chunk size line: %r" % buffer[:line_end][:40]) from None
            if size == 0:
                trailer_end = buffer.find(b"\r\n", line_end + 2)
                if trailer_end < 0:
                    self._buffer = buffer
                    return None
                if trailer_end != line_end + 2:  # trailers: skip them up to the empty line
                    trailer_end = buffer.find(HEAD_END, line_end)
                    if trailer_end < 0:
                        self._buffer = buffer
                        return None
                    trailer_end += 2
                self._buffer = buffer[trailer_end + 2:]
                return self._finish(b"".join(self._chunks))
            data_end = line_end + 2 + size
            if len(buffer) < data_end + 2:
                self._buffer = buffer
                return None
            self._chunks.append(buffer[line_end + 2:data_end])
            buffer = buffer[data_end + 2:]

    def _finish(self, body, keep_alive=None):
        response = Response(self._status, self._head, body,
                            self._keep_alive if keep_alive is None else keep_alive)
        self._reset()
        return response
