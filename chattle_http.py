"""Chattle's HTTP layer: gevent.pywsgi's server and handler, made cheap per held poll and
safe against hostile clients.

Everything here (and in chattle_request.py, which reads a connection's input) changes when
gevent (or gunicorn's gevent worker) changes; the chat lives in chattle.py, which hands
this module its settings as arguments. What a connection may do, and what it costs:

- Its request head (request line and headers) arrives within `head_timeout` of its first
  byte (of the previous answer, on a keep-alive connection), fits in `max_head_bytes` and
  holds at most `max_headers` headers; otherwise 431 as JSON. Its request line fits in
  `max_line_bytes`; otherwise 414 as JSON.
- Before a request starts, it may sit idle for `keepalive_timeout`.
- An answer the client does not take within `send_timeout` drops the connection.
- The answers a worker holds for clients still taking them are bounded: past
  `max_unsent_bytes`, the connections that have held theirs longest are dropped.
- A held poll has none of these deadlines: it lasts its own timeout, and costs them nothing.
- A head that frames its body ambiguously (a Transfer-Encoding other than exactly
  `chunked`, both Transfer-Encoding and Content-Length, conflicting Content-Lengths) is
  refused with 400 and the connection closed: behind a proxy it could smuggle a request.

Every refusal is a JSON answer, `{"error": ...}`, with `Connection: close`.
"""

import fcntl
import json
import os
import socket
import sys
import termios
import time
from http import HTTPStatus
from urllib.parse import unquote_to_bytes

import gevent
from gevent import pool, pywsgi
from greenlet import getcurrent, greenlet

from chattle_request import (  # noqa: F401  (unsent_bytes, unsent_dropped: what /stats reads of this layer)
    READ_BUFFER_BYTES,
    Deadlines,
    Refused,
    RequestHeaders,
    RequestReader,
    body_length,
    unsent_bytes,
    unsent_dropped,
)

###############################################################################
# Settings: the limits, each with a flag and a CHATTLE_* variable
###############################################################################

# (name, environment variable, type, default, help), as chattle.SETTINGS.
LIMIT_SETTINGS = [
    ("head_timeout", "CHATTLE_HEAD_TIMEOUT", float, 10.0,
     "seconds a request head may take, from its first byte (from the previous answer on a "
     "keep-alive connection); then the connection is closed"),
    ("keepalive_timeout", "CHATTLE_KEEPALIVE_TIMEOUT", float, 10.0,
     "seconds a connection may wait idle for its next (or first) request; then it is closed"),
    ("send_timeout", "CHATTLE_SEND_TIMEOUT", float, 30.0,
     "seconds an answer may wait for the client to take it; then the connection is dropped"),
    ("max_head_bytes", "CHATTLE_MAX_HEAD_BYTES", int, 32 * 1024,
     "bytes of request line and headers together (more: 431, or 414 for the request line)"),
    ("max_headers", "CHATTLE_MAX_HEADERS", int, 100, "request headers (more: 431)"),
    ("max_line_bytes", "CHATTLE_MAX_LINE_BYTES", int, 8 * 1024,
     "bytes of the request line, without its line break (more: 414), as nginx by default"),
    ("max_unsent_bytes", "CHATTLE_MAX_UNSENT_BYTES", int, 64 * 1024 * 1024,
     "bytes of answers a worker holds for clients still taking them; beyond, the connections "
     "that have held theirs longest are dropped"),
]


def values_from_environ(table, environ=os.environ):
    """{name: value} for every setting of `table` whose variable is set in `environ`."""
    values = {}
    for name, env, kind, _default, _help in table:
        if env in environ:
            try:
                values[name] = kind(environ[env])
            except ValueError:
                raise SystemExit("chattle: %s=%r is not a valid %s" % (env, environ[env], kind.__name__))
    return values


class HttpLimits:
    """The limits one server applies to every connection (see the module's docstring)."""

    __slots__ = tuple(name for name, *_rest in LIMIT_SETTINGS)

    def __init__(self, **values):
        for name, _env, kind, default, _help in LIMIT_SETTINGS:
            value = kind(values.get(name, default))
            if not value > 0:
                raise SystemExit("chattle: --%s must be above 0" % name.replace("_", "-"))
            setattr(self, name, value)

    @classmethod
    def from_environ(cls, environ=os.environ):
        return cls(**values_from_environ(LIMIT_SETTINGS, environ))


###############################################################################
# Refusals: JSON answers written by the HTTP layer itself
###############################################################################

JSON_TYPE = b"application/json; charset=utf-8"


# Why a request was refused, counted per process for /stats and /metrics. The reasons are
# a fixed set (REFUSAL_REASONS), so the table never grows past it.
REFUSAL_REASONS = {
    # by the HTTP layer, from the status it answers
    400: "malformed_request", 404: "path_not_utf8", 408: "head_timeout", 414: "request_line_too_long",
    431: "head_too_large", 505: "http_version",
}
_refusals = {}


def count_refusal(reason):
    _refusals[reason] = _refusals.get(reason, 0) + 1


def refusals():
    """{reason: requests refused for it} since this process started."""
    return dict(_refusals)


def refusal(status, message, date):
    """The complete bytes of a JSON error answer that closes the connection."""
    body = json.dumps({"error": message}).encode("ascii")
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\nDate: %s\r\n\r\n" % (
        status, HTTPStatus(status).phrase.encode("ascii"), JSON_TYPE, len(body), date)
    return head + body


class HttpDate:
    """The Date header, formatted once a second rather than once per answer."""

    __slots__ = ("second", "value")

    def __init__(self):
        self.second, self.value = -1, b""

    def now(self):
        second = int(time.time())
        if second != self.second:
            self.second, self.value = second, pywsgi.format_date_time(second)
        return self.value


http_date = HttpDate()


###############################################################################
# Whole answers: a 200 JSON body the application hands the handler directly
###############################################################################

# In every environ this layer builds: the application may raise SendJson. Its value says
# whether the application may also empty the environ before it does (FORGET: nothing of
# this layer reads the environ after the application has raised SendJson), or not (KEEP:
# an access log reads it once the answer is sent).
SENDS_JSON = "chattle.sends_json"
FORGET, KEEP = "forget", "keep"


class SendJson(BaseException):
    """Raised by the application to answer its request with `body`, 200 and JSON; with
    `close`, the connection closes after it.

    The handler sends the head, framed once per (length, Connection) and second, and the
    body in one send. A fan-out answers N waiters with one body; returned through Bottle
    and pywsgi, each of them walked Bottle's response object, its header list, pywsgi's
    start_response with its checks and its header assembly, to make the same head N
    times. A BaseException, so that Bottle, which turns every Exception its route raises
    into a 500, lets it through (tests/server/test_internals.py pins that). Only raised where
    environ[SENDS_JSON] says this layer is there to catch it."""

    def __init__(self, body, close=False):
        super().__init__()
        self.body = body
        self.close = close


class OkJsonHeads:
    """The heads of 200 JSON answers, as Bottle and pywsgi make them (Content-Length,
    Content-Type, the Connection pywsgi adds for HTTP/1.0, Date), by (body length,
    Connection); made again when the Date changes, and never more than MAX_KEPT."""

    __slots__ = ("date", "by_key")

    MAX_KEPT = 256

    def __init__(self):
        self.date, self.by_key = None, {}

    def head(self, length, connection):
        date = http_date.now()
        if date is not self.date:
            self.date, self.by_key = date, {}
        key = (length, connection)
        head = self.by_key.get(key)
        if head is None:
            if len(self.by_key) >= self.MAX_KEPT:
                self.by_key.clear()
            connection_line = b"Connection: %s\r\n" % connection if connection else b""
            head = self.by_key[key] = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: %s\r\n"
                                       b"%sDate: %s\r\n\r\n" % (length, JSON_TYPE, connection_line, date))
        return head


ok_json_heads = OkJsonHeads()


###############################################################################
# Held polls: a client that leaves ends its poll
###############################################################################

# In every environ this layer builds: the connection's reader (RequestReader), whose
# socket a held poll watches for its client's close (watch_peer). Read before the
# environ is emptied (FORGET).
PEER = "chattle.peer"

# What watch_peer's watcher switches a held poll with: the watcher calls its callback
# with no arguments, so the switch returns the empty tuple, where the Events a poll parks
# on wake it with themselves. No argument tuple is kept per held poll.
STIRRED = ()


class Hold(BaseException):
    """Raised by the application, as Hold(poll), to hold its request outside its own call
    stack: `poll.answer()` waits, then returns (body, close) for a 200 JSON answer (close:
    the connection closes after it) or raises PeerGone. The handler calls it once the
    exception, and with it every frame of the application and of Bottle between the
    handler and the raise, is gone. A held poll's greenlet then keeps neither those frames
    nor what their locals hold (the route's arguments, the path), and none of the C stack
    of Bottle's `route.call(**args)`, a call that enters the eval loop again in C and that
    greenlet saves for as long as the poll is held (about 460 bytes). A BaseException, as
    SendJson, so that Bottle lets it through; BaseException's own constructor keeps the
    poll (args[0]), as a Python one would cost every held poll a call more. Only raised
    where environ[SENDS_JSON] says this layer is there to catch it."""


class PeerGone(BaseException):
    """Raised by the application when the client of a held poll closed or reset its
    connection: the handler closes it without an answer (logged as 499, as nginx does).
    A BaseException, as SendJson, so that Bottle lets it through."""


def watch_peer(peer, resume):
    """Have `resume()` called when the client's side of the connection stirs: it closes,
    resets, or sends bytes. `peer`: the connection's RequestReader, or (under another
    server) its gevent socket. The socket's own read watcher does it: nothing reads the
    socket while its poll is held, so watching costs no object per poll. The watcher, to
    stop when the poll ends; None when there is no gevent socket or it is being read."""
    sock = peer.sock if isinstance(peer, RequestReader) else peer
    watcher = getattr(sock, "_read_event", None)
    if watcher is None or watcher.callback is not None:
        return None
    watcher.start(resume)
    return watcher


def peer_gone(peer, watcher):
    """After `watcher` (of watch_peer) stirred: True when the client closed (FIN) or reset
    the connection. Bytes it sent instead (its next request, pipelined) are read into the
    connection's reader, up to READ_BUFFER_BYTES, for the handler to read once the poll is
    answered, and the poll is held on, still watched. Beyond that (or with no reader) they
    stay in the kernel and the watcher is stopped, since it would fire for as long as they
    are there: the client's close is then noticed only when the poll ends."""
    reader = peer if isinstance(peer, RequestReader) else None
    raw = (peer.sock if reader is not None else peer)._sock
    try:
        room = READ_BUFFER_BYTES - len(reader.pending) if reader is not None else 0
        if room > 0:
            data = raw.recv(room)
            if data:
                reader.pending += data
                return False
        elif raw.recv(1, socket.MSG_PEEK):
            watcher.stop()
            return False
    except BlockingIOError:
        return False  # stirred and settled: nothing to read after all
    except OSError:
        return True  # reset
    return True  # the end of the stream: the client closed, or shut down its sending side


###############################################################################
# The handler: pywsgi's WSGIHandler, lean per answer and strict per head
###############################################################################

# FIONREAD's answer (a C int) for a socket with no bytes waiting to be read.
NOTHING_UNREAD = bytes(4)


class ChattleHandling:
    """gevent.pywsgi's handler as chattle has it, mixed into it (or into a subclass of it,
    such as gunicorn's) by handler_class, under the class's `limits` (an HttpLimits):
    with what a held poll keeps and what a fan-out pays per woken poll taken out.

    A woken poll is answered and its connection closed inside the fan-out, so every
    step here is paid once per waiter: one send for the head and body together
    (pywsgi sends them apart, and asks the kernel for SO_SNDBUF before each), a plain
    close of the descriptor after every waiter has its answer, and no access-log line
    formatted without a log. The head is read, checked and turned into the environ by
    this class's own code (pywsgi's read_requestline, read_request, get_environ and
    their header object are not used)."""

    __slots__ = ()  # a mixin: instances are laid out by the base handler
    limits = None       # an HttpLimits: set on each class handler_class makes
    access_log = False  # whether requests are logged (gunicorn's access log, or --access-log)
    deadlines = None    # the Deadlines of the connections of every handler of the class
    MessageClass = RequestHeaders

    def __init__(self, sock, address, server, rfile=None):
        super().__init__(sock, address, server, rfile or RequestReader(sock, self.deadlines))

    def handle(self):
        # pywsgi's own loop, but for the yield before a keep-alive connection's next
        # request, the deadline it has meanwhile and the closing at the end.
        try:
            while self.socket is not None:
                self.time_start = time.time()
                self.time_finish = 0
                result = self.handle_one_request()
                if result is None:
                    break
                if result is True:
                    self.rfile.expect_request(time.monotonic())
                    # Answer first, read on after: see close_socket. A long-poll
                    # client asks again at once, so by then its request is often
                    # in already, and nothing parks on the socket to wait for it.
                    gevent.sleep(0)
                    continue
                self.status, answer = result  # a refusal: sent, logged, then the connection closes
                self.rfile.send(answer)
                self.time_finish = time.time()
                break
        except OSError:
            pass  # the client went away, or its deadline passed: nothing to tell it
        finally:
            self.close_socket()

    def handle_one_request(self):
        """Read, check and answer one request: True to read on, None to close, or
        (status, answer bytes) for a refusal the loop sends before it closes."""
        rfile, limits = self.rfile, self.limits
        if rfile.closed:
            return None
        try:
            head = rfile.read_head(limits.max_head_bytes, limits.max_line_bytes)
            if not head:
                return None
            self.response_length = 0
            self.environ = self.get_environ(RequestHeaders(head, limits.max_headers))
            head = None  # not kept in this frame while the request is held
        except Refused as refused:
            return self.refuse(refused)
        self.application = self.server.application
        self.handle_one_response()
        if self.close_connection or rfile.closed:
            return None
        return True

    def refuse(self, refused):
        self.close_connection = True
        count_refusal(REFUSAL_REASONS.get(refused.status, "http_%d" % refused.status))
        self.log_error("(from %s) %d %s", self.client_address, refused.status, refused.message)
        return str(refused.status), refusal(refused.status, refused.message, http_date.now())

    def get_environ(self, head):
        """The WSGI environ of a checked head, as pywsgi's get_environ builds it (headers
        as HTTP_*; a name with '_' dropped, as pywsgi does, so that it cannot pose as
        another; repeated ones joined), with its body framing checked first.

        A held poll keeps its environ, and nothing else of its head: the method and
        protocol words are shared by every request, and the parsed head is kept only
        for an access log."""
        environ = self.server.get_environ()
        logged = self.wants_access_log()
        environ[SENDS_JSON] = KEEP if logged else FORGET
        environ[PEER] = self.rfile
        for name, value in head.fields:
            if "_" in name:
                continue
            key = name.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            if key in environ:
                environ[key] += ("; " if key == "HTTP_COOKIE" else ",") + value
            else:
                environ[key] = value
        content_length, chunked = body_length(environ.get("CONTENT_LENGTH"),
                                              environ.get("HTTP_TRANSFER_ENCODING"))
        version = sys.intern(head.version)
        connection = environ.get("HTTP_CONNECTION", "").lower()
        self.close_connection = connection == "close" if version == "HTTP/1.1" else connection != "keep-alive"
        path, _question, query = head.target.partition("?")
        if "%" in path:
            raw_path = unquote_to_bytes(path)
            path = raw_path.decode("latin-1")
        else:
            raw_path = path.encode("latin-1")
        try:
            raw_path.decode("utf-8")
        except UnicodeDecodeError:
            # Bottle would drop the bytes that are not UTF-8 and serve what is left:
            # /rooms/lob%FFby/msgs would be room "lobby". No route has such a path.
            raise Refused(404, "no such route: the path is not valid UTF-8 once percent-decoded")
        environ["REQUEST_METHOD"] = self.command = sys.intern(head.command)
        environ["SERVER_PROTOCOL"] = self.request_version = version
        environ["SCRIPT_NAME"] = ""
        environ["PATH_INFO"] = path
        environ["QUERY_STRING"] = query
        if isinstance(self.client_address, tuple):
            environ["REMOTE_ADDR"] = str(self.client_address[0])
            environ["REMOTE_PORT"] = str(self.client_address[1])
        if logged:
            self.headers = head
            self.requestline = "%s %s %s" % (head.command, head.target, head.version)
            environ["RAW_URI"] = head.target  # gunicorn's access log reads it
        self.content_length = content_length
        continue_socket = self.socket if environ.get("HTTP_EXPECT", "").lower() == "100-continue" else None
        self.wsgi_input = environ["wsgi.input"] = pywsgi.Input(
            self.rfile, content_length, socket=continue_socket, chunked_input=chunked)
        environ["wsgi.input_terminated"] = True
        return environ

    def close_socket(self):
        sock = self.__dict__.pop("socket", None)
        rfile = self.__dict__.pop("rfile", None)
        self.__dict__.pop("wsgi_input", None)
        if rfile is not None:
            rfile.close()
        if sock is None or sock.closed:
            return
        raw = sock._sock
        # Nothing waits on this socket (this greenlet is its only user), so gevent's
        # close path, which cancels waiters and defers the close past them, has
        # nothing to do: close the descriptor and mark the wrapper closed.
        sock._closed = True
        try:
            # Answer first, tidy up after. In a fan-out this greenlet runs inside the
            # hub's loop over every woken waiter; closing the descriptor and ending
            # the greenlet (which unmaps its frame stack) here would hold up every
            # waiter still to be answered, so yield until that loop is through.
            gevent.sleep(0)
            # Unread bytes at close make the kernel send a reset, which can destroy
            # the answer before the client reads it: take them first (never blocks).
            # The kernel is asked first whether there are any: a recv with nothing to
            # read raises, about twice the cost of the question, once per closed poll.
            if fcntl.ioctl(raw.fileno(), termios.FIONREAD, NOTHING_UNREAD) != NOTHING_UNREAD:
                raw.recv(16384)
        except OSError:
            pass
        finally:
            raw.close()

    def wants_access_log(self):
        return self.access_log

    def log_request(self):
        # pywsgi formats the access-log line (dates, strings) even when it has no log.
        if self.wants_access_log():
            super().log_request()

    def run_application(self):
        """pywsgi reads and discards whatever body the application left unread, even
        when the answer closes the connection: a refused 10 MB upload (413) would
        still be read in full, and a client that never sends it would hold its
        greenlet for good. An answer that closes the connection has no next request
        to find, so that read is skipped; on a keep-alive connection the rest of the
        body must arrive within the head deadline, as the next head would.

        An application that raises SendJson is answered here, without pywsgi; one that
        raises PeerGone (its client left while its poll was held) is not answered; one
        that raises Hold is held here, and answered as its poll's answer() raises.

        pywsgi's run_application is inlined (the result's close() and all), not called:
        every Python frame on a held poll's stack is one more frame object that greenlet
        makes for it on Python 3.12 and later."""
        try:
            try:
                held = self.call_application()
                if held is None:
                    self.process_result()
                else:
                    body, close = held.answer()
                    self.send_json(body, close)
            finally:
                close = getattr(self.result, "close", None)
                self.result = None
                if close is not None:
                    close()
        except SendJson as answer:
            self.send_json(answer.body, answer.close)
        except PeerGone:
            self.close_connection = True
            self.code, self._orig_status = 499, "499 Client Closed Request"
            self.status = self._orig_status.encode("ascii")
            self.response_headers = []
        finally:
            body = self.wsgi_input
            if body is not None:
                if self.close_connection:
                    body.content_length = body.position
                    body.chunked_input = False
                elif body.chunked_input or body.position < (body.content_length or 0):
                    self.rfile.until = time.monotonic() + self.limits.head_timeout

    def call_application(self):
        """Call the application; the poll it holds (Hold), if it holds one. The frames the
        raise passed through are gone once this returns, this one's too: a frame a
        traceback has touched keeps a frame object (about 240 bytes) while it runs."""
        try:
            self.result = self.application(self.environ, self.start_response)
        except Hold as hold:
            return hold.args[0]
        return None

    def send_json(self, body, close):
        """Answer 200 with the JSON `body`: the bytes pywsgi would send for it, as one
        send, and the state its log_request and the handler's loop read afterwards."""
        if close:
            self.close_connection = True
            connection = b"close"
        elif self.request_version == "HTTP/1.0":  # as pywsgi's start_response
            connection = b"close" if self.close_connection else b"keep-alive"
        else:
            connection = None
        head = ok_json_heads.head(len(body), connection)
        self.code, self.status, self._orig_status = 200, b"200 OK", "200 OK"
        self.headers_sent = True
        if self.wants_access_log():
            self.response_headers = [(b"Content-Type", JSON_TYPE)]
        self._sendall(head, b"" if self.command == "HEAD" else body)

    def _send_error_response_if_possible(self, error_code):
        # pywsgi's canned 400 (a broken chunked body) and 500 are plain text
        if self.response_length:
            self.close_connection = True
            return
        message = ("the request body is malformed" if error_code == 400 else
                   "the server failed on this request; it was not applied, please retry")
        body = json.dumps({"error": message}).encode()
        try:
            self.start_response("%d %s" % (error_code, HTTPStatus(error_code).phrase),
                                [("Content-Type", JSON_TYPE.decode()), ("Connection", "close"),
                                 ("Content-Length", str(len(body)))])
            self.write(body)
        except OSError:
            self.close_connection = True

    def finalize_headers(self):
        if self.provided_date is None:
            self.provided_date = date = http_date.now()
            self.response_headers.append((b"Date", date))
        super().finalize_headers()

    def _write_with_headers(self, data):
        self.headers_sent = True
        self.finalize_headers()
        parts = [b"HTTP/1.1 ", self.status, b"\r\n"]
        for name, value in self.response_headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        if data:
            if self.response_use_chunked:
                parts += (b"%x\r\n" % len(data), data, b"\r\n")
            else:
                parts.append(data)
        self._sendall(b"".join(parts))

    def _sendall(self, data, body=b""):
        try:
            self.rfile.send(data, body)  # an answer fits the send buffer: one call
        except OSError as exc:
            self.status = "socket error: %s" % exc
            if self.code > 0:
                self.code = -self.code
            raise
        self.response_length += len(data) + len(body)


def handler_class(limits, base=None, access_log=False):
    """A handler class: ChattleHandling over gevent.pywsgi's handler or `base` (a subclass
    of it such as gunicorn's, known only at run time: hence a class made per call), under
    `limits` (an HttpLimits), logging requests when `access_log`. Each class has its own
    Deadlines for its connections."""
    if base is None:
        base = pywsgi.WSGIHandler
    return type("ChattleHandler", (ChattleHandling, base),
                {"limits": limits, "access_log": access_log, "deadlines": Deadlines(limits)})


###############################################################################
# The server
###############################################################################

class ConnectionPool(pool.Pool):
    """A gevent Pool that serves each connection in a plain greenlet, as a server without
    a pool does, and still counts them: gunicorn's worker bounds its connections with a
    Pool (worker_connections), reads its free_count() and size to stop gracefully, and
    gevent's server stops accepting while it is full and kills what is left at stop.

    gevent's Pool spawns a gevent Greenlet per connection (links, result and exception
    slots, a compiled run() between the greenlet and the handler, and the deeper C stack
    that adds), kept for as long as the poll is held. A Group holds plain greenlets as
    well (it kills them with gevent.kill); this one discards each as its function ends."""

    def spawn(self, function, sock, address):
        """Serve one connection (what gevent's server spawns): function(sock, address)."""
        hub = gevent.get_hub()
        # The class's function, not the bound method: see ChattleServing.do_handle.
        connection = greenlet(ConnectionPool._serve, hub)  # what gevent.spawn_raw makes
        self.add(connection)  # waits while the pool is full, as Pool.spawn does
        hub.loop.run_callback(connection.switch, self, function, sock, address)
        return connection

    def _serve(self, function, sock, address):
        # Arguments by position, not *args: a call with *args recurses in C, and the C
        # stack a held poll saves grows by that level.
        try:
            function(sock, address)
        finally:
            self.discard(getcurrent())


_open_connections = 0  # accepted and not yet done with, over every server of this process


def open_connections():
    """Connections accepted and not yet closed: each is one greenlet and one descriptor."""
    return _open_connections


class ChattleServing:
    """What chattle makes of gevent.pywsgi's server, mixed into it (or into a subclass of
    it, such as gunicorn's) by server_class: one plain greenlet per connection, counted,
    each served by the class's `handler_class`."""

    __slots__ = ()

    def __init__(self, *args, spawn="default", **kwargs):
        if type(spawn) is pool.Pool:  # gunicorn's worker_connections
            spawn = ConnectionPool(spawn.size)
        super().__init__(*args, spawn=spawn, **kwargs)

    def do_handle(self, sock, address):
        # Without a pool (python chattle.py) a connection gets a plain greenlet.
        # gevent's Greenlet (links, result and exception slots, a compiled run()
        # between the greenlet and the handler) and its spawn function, which
        # unpacks (handle, close, args) with a *-call, cost every held poll memory
        # and C stack. A pool (gunicorn's worker_connections, and its graceful
        # stop, which waits for the pool to drain) is a ConnectionPool: plain
        # greenlets too.
        # The greenlet runs the class's function rather than the bound method: a bound
        # method started from C passes through its own C call level, and greenlet saves
        # the C stack under a held poll for as long as it is held (144 bytes more).
        global _open_connections
        _open_connections += 1
        try:
            if self.pool is None:
                gevent.spawn_raw(ChattleServing.serve_connection, self, sock, address)
            else:
                self.pool.spawn(self.serve_connection, sock, address)
        except BaseException:
            _open_connections -= 1
            self.do_close(sock)
            raise

    def serve_connection(self, sock, address):
        global _open_connections
        try:
            self.handler_class(sock, address, self).handle()
        except Exception:
            # A plain greenlet has nobody to report to: report as gevent would.
            self.loop.handle_error(self, *sys.exc_info())
        finally:
            self.do_close(sock)
            _open_connections -= 1

    def do_close(self, sock, *_address):
        if not sock.closed:  # the handler closes its socket itself
            sock.close()


def server_class(limits, base=None, access_log=False):
    """gevent.pywsgi's server (or `base`, a subclass of it such as gunicorn's) running
    a handler_class(limits), one greenlet per connection."""
    if base is None:
        base = pywsgi.WSGIServer
    return type("ChattleServer", (ChattleServing, base),
                {"handler_class": handler_class(limits, access_log=access_log)})
