"""The clients the tests share: a raw HTTP/1.1 connection, one-shot JSON calls, followers
that keep a ledger of a room, and an in-process WSGI caller.

Every wait here has a deadline: a server that stops answering fails a test, it never
hangs it.
"""

import http.client
import io
import json
import os
import socket
import subprocess
import sys
import time

import gevent
from gevent.pool import Pool

import chattle
from chattle_limits import client_timeout
from harness.processes import ROOT, SEED_FLAGS, free_port, get_json, post_json, wait_until
from instruments.httpframe import ResponseParser
from instruments.measures import DeliveryLedger, wakeup_latency

GENEROUS = 30.0  # seconds: a deadline for what should take milliseconds, on a loaded machine


###############################################################################
# One raw HTTP/1.1 connection: keep-alive, pipelining and early closes are visible
###############################################################################

class HttpConnection:
    """A minimal HTTP/1.1 client on one raw socket, so keep-alive and early closes are visible."""

    def __init__(self, port, timeout=GENEROUS):
        self.timeout = timeout
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.parser = ResponseParser()

    @property
    def buffer(self):
        """What the server sent after the last answer read: the start of another."""
        return self.parser.buffered

    def send(self, method, path, body=None, headers=None):
        lines = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1"]
        if body is not None:
            if not isinstance(body, bytes):
                body = json.dumps(body).encode()
            lines += ["Content-Type: application/json", "Content-Length: %d" % len(body)]
        lines += ["%s: %s" % item for item in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))

    def receive(self, within=None):
        """(status, headers with lower-case names, decoded JSON body or raw bytes), read
        within `within` seconds (the connection's timeout by default) however the bytes
        trickle, framed by the harness's one framer (Content-Length, chunked or close)."""
        deadline = time.monotonic() + (self.timeout if within is None else within)
        answer = self.parser.feed(b"") if self.parser.pending else None  # pipelined: already here
        while answer is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no whole answer from the server in time")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if chunk:
                answer = self.parser.feed(chunk)
            else:
                answer = self.parser.feed_eof()
                if answer is None:
                    raise ConnectionError("the server closed the connection")
        _status_line, *header_lines = answer.head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        body = answer.body
        if headers.get("content-type", "").startswith("application/json"):
            body = json.loads(body)
        return answer.status, headers, body

    def request(self, method, path, body=None, headers=None):
        self.send(method, path, body, headers)
        return self.receive()

    def server_closed(self, within=GENEROUS):
        """True once the server has closed its end (it may have answered first)."""
        deadline = time.monotonic() + within
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.001, deadline - time.monotonic()))
                if not self.sock.recv(65536):
                    return True
            return False
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


def held_poll(port, path):
    connection = HttpConnection(port)
    try:
        return connection.request("GET", path)
    finally:
        connection.close()


def settle(check, what, within=GENEROUS, step=0.005):
    """Yield to the hub until `check()` holds: the synchronisation for tests inside one
    process (parked greenlets, a pool, a log). Bounded by `within`, never by a count of
    steps, since a loaded machine makes each step slower."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("%s: not so after %g s" % (what, within))
        gevent.sleep(step)


###############################################################################
# One-shot calls against a running server
###############################################################################

def stats(server):
    status, body = get_json(server.url + "/stats")
    assert status == 200
    return body


def wait_for_waiters(server, count, within=GENEROUS):
    """Until the server holds exactly `count` polls; past `within`, a failure that says how many it held."""
    seen = []

    def held():
        seen.append(stats(server)["waiters"])
        return seen[-1] == count

    try:
        wait_until(held, within, "%d held polls" % count)
    except RuntimeError as error:  # what wait_until raises at its deadline
        raise AssertionError("%s; the server held %s" % (error, seen[-1:])) from None


def wait_for_waiters_across_workers(server, count, within=GENEROUS):
    """Until the workers behind one port hold `count` polls between them: each /stats
    answer is one worker's, so the newest answer of every pid seen is summed."""
    newest = {}

    def held():
        body = stats(server)
        newest[body["pid"]] = body["waiters"]
        return sum(newest.values()) == count

    try:
        wait_until(held, within, "%d held polls" % count, interval=0.01)
    except RuntimeError as error:
        raise AssertionError("%s; the workers held %s" % (error, newest)) from None


def post(server, room, content="hi", sender="ann"):
    status, body = post_json(server.url + "/rooms/%s/msgs" % room, {"from": sender, "content": content})
    assert status == 201, body
    return body


def room_last_id(server, room):
    status, body = get_json("%s/rooms/%s/msgs?limit=1" % (server.url, room))  # no since: the newest
    assert status == 200, body
    return body["cursor"]


def post_once(port, room, content, timeout=10.0):
    """One post on a fresh connection, so posts spread over the workers. (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/rooms/%s/msgs" % room, body=json.dumps({"from": "poster", "content": content}),
                           headers={"Content-Type": "application/json", "Connection": "close"})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read()), answer.getheader("Retry-After")
    finally:
        connection.close()


###############################################################################
# Followers: clients that follow a room by cursor and judge what they got
###############################################################################

class Listener:
    """One client following one room by cursor; reconnects and resumes after any error."""

    def __init__(self, server, room, poll_timeout=5.0):
        self.host, self.port = "127.0.0.1", server.port
        self.room = room
        self.poll_timeout = poll_timeout
        self.ledger = DeliveryLedger(0)
        self.cursor = 0
        self.contents = {}          # id -> content as received
        self.resets = 0
        self.reconnects = 0
        self.errors = 0             # non-200 answers (503 while a bus is down)
        self.worker_pid = None
        self.latencies = []
        self.connection = None
        self.polls_started = 0

    def _connect(self):
        self.connection = http.client.HTTPConnection(self.host, self.port,
                                                     timeout=client_timeout(self.poll_timeout) + 5)

    def _drop(self):
        if self.connection is not None:
            self.connection.close()
        self.connection = None

    def get(self, path):
        if self.connection is None:
            self._connect()
        self.connection.request("GET", path)
        answer = self.connection.getresponse()
        return answer.status, json.loads(answer.read())

    def identify(self):
        """Which worker this listener's connection landed on (kept alive, so it stays)."""
        try:
            _status, stats = self.get("/stats")
            self.worker_pid = stats["pid"]
        except (OSError, http.client.HTTPException, ValueError):
            self._drop()

    def follow(self, done, deadline):
        while not done(self) and time.monotonic() < deadline:
            try:
                self.polls_started += 1
                status, body = self.get("/rooms/%s/msgs?since=%d&timeout=%g&limit=1000"
                                        % (self.room, self.cursor, self.poll_timeout))
            except (OSError, http.client.HTTPException, ValueError):
                self.reconnects += 1
                self._drop()
                gevent.sleep(0.1)
                continue
            if status != 200:
                self.errors += 1
                self._drop()
                gevent.sleep(0.2)
                continue
            received_at = time.time()
            if body.get("reset"):
                self.resets += 1
            for message in body["messages"]:
                self.ledger.record(message["id"])
                self.latencies.append(wakeup_latency(received_at, message["ts"]))
                if self.contents.setdefault(message["id"], message["content"]) != message["content"]:
                    self.ledger.duplicated += 1  # the same id came back with other content
            self.cursor = body["cursor"]
        self._drop()


class Poster:
    """Posts numbered messages; remembers what each accepted id carried."""

    def __init__(self, port, room):
        self.port, self.room = port, room
        self.acknowledged = {}      # id -> content
        self.duplicate_ids = 0      # the same id handed out twice (only a diverged bus does that)
        self.refused = 0            # 503s
        self.failed = 0             # connection errors
        self.sent = 0

    def post(self, content):
        self.sent += 1
        try:
            status, body, _retry_after = post_once(self.port, self.room, content)
        except (OSError, http.client.HTTPException, ValueError):
            self.failed += 1
            return None
        if status != 201:
            self.refused += 1
            return None
        if body["id"] in self.acknowledged:
            self.duplicate_ids += 1
        self.acknowledged[body["id"]] = content
        return body["id"]

    def burst(self, count, concurrency=4, pause=0.0, within=240.0):
        pool = Pool(concurrency)
        for number in range(count):
            pool.spawn(self.post, "message %d" % number)
            if pause:
                gevent.sleep(pause)
        if not pool.join(timeout=within):
            pool.kill()
            raise AssertionError("%d posts were not all answered within %gs" % (count, within))


###############################################################################
# In process: chattle.app called as a WSGI server would
###############################################################################

class WsgiAnswer:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self):
        return json.loads(self.body)

    def header(self, name):
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def call_wsgi(method, path, body=b"", headers=None, query=""):
    """Call chattle.app directly, as a WSGI server would, and collect the whole answer."""
    if "?" in path:
        path, query = path.split("?", 1)
    if isinstance(body, str):
        body = body.encode("utf-8")
    environ = {
        "REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body), "wsgi.errors": io.StringIO(), "wsgi.version": (1, 0),
        "wsgi.multithread": False, "wsgi.multiprocess": False, "wsgi.run_once": False,
        "CONTENT_LENGTH": str(len(body)) if body else "",
    }
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            environ[key] = value
        else:
            environ["HTTP_" + key] = value
    captured = {}

    def start_response(status, response_headers, exc_info=None):
        captured["status"] = int(status.split()[0])
        captured["headers"] = response_headers

    chunks = chattle.app(environ, start_response)
    data = b"".join(chunks)
    if hasattr(chunks, "close"):
        chunks.close()
    return WsgiAnswer(captured["status"], captured["headers"], data)


# -- raw sockets, driven as a hostile client drives them ------------------------------------

class Raw(HttpConnection):
    """One client socket, driven byte by byte, as a hostile client drives it."""

    def __init__(self, port, receive_buffer=None):
        self.sock = socket.socket()
        if receive_buffer:  # before connecting, so that the window stays that small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.timeout = 10.0
        self.sock.settimeout(self.timeout)
        self.sock.connect(("127.0.0.1", port))
        self.parser = ResponseParser()

    def answer(self, within=10.0):
        """(status, lower-case headers, body: decoded JSON when JSON, else bytes)."""
        return self.receive(within)

    def closed_by_server(self, within):
        """True when the server closes (or resets) the connection within `within` seconds;
        whatever it sends before is read and dropped."""
        return self.server_closed(within)


def request(method, path, headers=(), body=b""):
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def read_to_end(sock, timeout=10):
    """Every byte until the peer closes, then close `sock` too."""
    sock.settimeout(timeout)
    received = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
    finally:
        sock.close()


# -- gunicorn, as it really runs ---------------------------------------------------------------

def effective_config(env=None):
    """The settings gunicorn really runs the seed's command with, as it reports them."""
    output = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--print-config", "--bind", "127.0.0.1:%d" % free_port(), *SEED_FLAGS],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
        env=None if env is None else dict(os.environ, **env)).stdout
    config = {}
    for line in output.splitlines():
        name, equals, value = line.partition("=")
        if equals:
            config[name.strip()] = value.strip()
    return config


def connections_to_each_worker(port, pids, within=GENEROUS):
    """{pid: a keep-alive HttpConnection to that worker} for every pid of `pids`: fresh
    connections until the kernel has handed one to each (a connection stays on its worker)."""
    wanted = set(pids)
    found = {}
    deadline = time.monotonic() + within
    try:
        while set(found) != wanted:
            if time.monotonic() > deadline:
                raise AssertionError("no connection reached workers %s within %g s"
                                     % (sorted(wanted - set(found)), within))
            connection = HttpConnection(port)
            _status, _headers, body = connection.request("GET", "/stats")
            if body["pid"] in wanted and body["pid"] not in found:
                found[body["pid"]] = connection
            else:
                connection.close()
    except BaseException:
        close_all(found)
        raise
    return found


def close_all(connections):
    for connection in connections.values():
        connection.close()
