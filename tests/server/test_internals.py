"""The library internals chattle and chattle_http rely on, checked so that an upgrade of
bottle, gevent, gunicorn or greenlet that changes one fails here, loudly and by name,
instead of quietly costing memory, calls or safety:

- bottle's thread-local attributes, which chattle moves into the greenlet (BOTTLE_LOCAL_STATE);
- bottle's `_parse_qsl`, which chattle calls instead of `request.query`;
- bottle letting a BaseException its route raises through (chattle_http.SendJson);
- gevent's Pool and Group as chattle_http.ConnectionPool uses them;
- every pywsgi hook chattle_http's handler overrides (each must still be called by pywsgi
  for an ordinary request) and every pywsgi attribute or helper it touches;
- gunicorn's worker really serving through chattle's handler (ChattleWorker);
- the access-log path, with a log turned on, under `python chattle.py` and gunicorn.
"""

import json
import subprocess
import sys

import pytest
from gevent import pywsgi, socket

import chattle
import chattle_http
from clients import GENEROUS, Raw, read_to_end, request
from harness.processes import ROOT, ChattleServer, get_json, wait_until

# -- bottle -----------------------------------------------------------------------------------

BOTTLE_LOCALS = """
import bottle, inspect, json
found = {}
for name, cls in vars(bottle).items():
    if inspect.isclass(cls):
        for attribute, value in vars(cls).items():
            if isinstance(value, property) and value.fget.__qualname__.startswith("_local_property"):
                found.setdefault(name, []).append(attribute)
print(json.dumps({name: sorted(attributes) for name, attributes in found.items()}))
"""


def test_bottles_thread_locals_are_exactly_the_ones_chattle_moves():
    """In a fresh interpreter (chattle replaces them on import): every attribute bottle
    keeps in a thread-local, by class. One chattle does not move would live in a
    gevent.local per greenlet again; one it moves that bottle no longer has is a sign
    that bottle changed how it keeps request state."""
    output = subprocess.run([sys.executable, "-c", BOTTLE_LOCALS], capture_output=True, text=True,
                            timeout=60, check=True, cwd=ROOT).stdout
    expected = {cls.__name__: sorted(names) for cls, names in chattle.BOTTLE_LOCAL_STATE}
    assert json.loads(output) == expected


def test_bottle_lets_a_send_json_from_its_route_through():
    """The poll's answer leaves its route as chattle_http.SendJson, past Bottle's
    _handle and wsgi: a Bottle that caught it would answer every poll with a 500."""
    import bottle

    app = bottle.Bottle()
    app.route("/whole", callback=lambda: (_ for _ in ()).throw(chattle_http.SendJson(b"{}")))
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/whole", "wsgi.errors": sys.stderr}
    with pytest.raises(chattle_http.SendJson):
        app.wsgi(environ, lambda *_args: None)


def test_gevents_pool_counts_and_releases_plain_greenlets_as_connection_pool_needs():
    from gevent.pool import Group, Pool

    assert issubclass(chattle_http.ConnectionPool, Pool) and Pool.discard is Group.discard
    served = []
    connections = chattle_http.ConnectionPool(2)
    connections.spawn(lambda sock, address: served.append((sock, address)), "sock", "address")
    assert connections.free_count() == 1 and not connections.full()
    assert connections.join(timeout=5), "the pool did not drain"
    assert served == [("sock", "address")] and connections.free_count() == 2


def test_bottles_parse_qsl_parses_as_chattle_expects():
    assert chattle.bottle._parse_qsl("since=7&limit=%31&timeout=a+b&since=8&flag") == [
        ("since", "7"), ("limit", "1"), ("timeout", "a b"), ("since", "8"), ("flag", "")]
    # the last of a repeated name wins, as with request.query.get
    assert dict(chattle.bottle._parse_qsl("since=1&since=2"))["since"] == "2"


# -- pywsgi: the hooks chattle_http overrides are still called ---------------------------------

OVERRIDDEN_HOOKS = ["handle", "handle_one_request", "get_environ", "run_application", "finalize_headers",
                    "_write_with_headers", "_sendall", "log_request"]
# Attributes chattle_http's handler reads or sets, which pywsgi's own code reads or sets too.
PYWSGI_ATTRIBUTES = ["socket", "rfile", "wsgi_input", "environ", "application", "close_connection",
                     "response_length", "time_start", "time_finish", "status", "code", "provided_date",
                     "response_headers", "headers_sent", "response_use_chunked", "command",
                     "request_version", "requestline", "headers", "content_length", "client_address",
                     "server"]
PYWSGI_METHODS_CALLED = ["handle_one_response", "log_error", "start_response", "write",
                         "_send_error_response_if_possible", "_handle_client_error", "handle_error"]


def test_pywsgis_handler_still_has_every_hook_and_attribute_chattle_http_uses():
    from gunicorn.workers.ggevent import PyWSGIHandler

    for name in OVERRIDDEN_HOOKS + PYWSGI_METHODS_CALLED:
        assert callable(getattr(pywsgi.WSGIHandler, name, None)), "pywsgi.WSGIHandler.%s is gone" % name
    handler = pywsgi.WSGIHandler.__new__(pywsgi.WSGIHandler)
    for name in PYWSGI_ATTRIBUTES:
        if name not in ("socket", "rfile", "server", "client_address"):  # set by __init__
            assert hasattr(handler, name), "pywsgi.WSGIHandler.%s (a class default) is gone" % name
    assert set(pywsgi.Input.__slots__) >= {"rfile", "content_length", "position", "chunked_input", "socket"}
    assert callable(pywsgi.Input._discard) and callable(pywsgi.format_date_time)
    # gunicorn's handler overrides only what chattle_http replaces or defers to
    assert {name for name in vars(PyWSGIHandler) if not name.startswith("__")} <= {"log_request", "get_environ"}


def test_gevent_sockets_still_wrap_a_non_blocking_socket():
    ours, theirs = socket.socketpair()
    try:
        assert ours._sock.gettimeout() == 0.0, "chattle_http reads and writes the descriptor directly"
        with pytest.raises(BlockingIOError):
            ours._sock.recv(1)
        assert ours.closed is False and hasattr(ours, "_closed")
        ours._closed = True  # what close_socket does, after closing the descriptor itself
        assert ours.closed is True
        ours._closed = False
    finally:
        ours.close()
        theirs.close()


def serve_one_connection(handler_class, application, data):
    """Serve one connection carrying `data` with `handler_class` over `application`, in
    this process; the bytes the client got."""
    ours, theirs = socket.socketpair()
    theirs.sendall(data)
    theirs.shutdown(socket.SHUT_WR)
    server = pywsgi.WSGIServer(("127.0.0.1", 0), application, handler_class=handler_class, log=None,
                               error_log=None)
    handler_class(ours, ("127.0.0.1", 1), server).handle()
    return read_to_end(theirs)


def test_pywsgi_calls_every_hook_chattle_http_overrides(app_state):
    called = []
    base = chattle.pywsgi_handler_class()

    def recording(name):
        def hook(self, *args, **kwargs):
            called.append(name)
            return getattr(base, name)(self, *args, **kwargs)
        return hook

    recorder = type("Recorder", (base,), {name: recording(name) for name in OVERRIDDEN_HOOKS})
    recorder.wants_access_log = lambda self: True  # log_request only logs with a log
    received = serve_one_connection(recorder, chattle.app.wsgi, request("GET", "/health"))
    assert received.startswith(b"HTTP/1.1 200 OK")
    assert set(called) == set(OVERRIDDEN_HOOKS), "never called: %s" % (set(OVERRIDDEN_HOOKS) - set(called))


def test_a_broken_chunked_body_and_a_crash_are_answered_as_json():
    """pywsgi answers both through _send_error_response_if_possible, which chattle_http
    overrides so that they are JSON too: a chunked body that turns out malformed while
    the application reads it (400), and an application that raises (500)."""
    handler_class = chattle_http.handler_class(chattle_http.HttpLimits())

    def reads_the_body(environ, start_response):
        environ["wsgi.input"].read()  # raises pywsgi's _InvalidClientInput, and lets it go
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    def crashes(environ, start_response):
        raise RuntimeError("a bug, on purpose")

    for application, data, status in [
            (reads_the_body, request("POST", "/", ["Transfer-Encoding: chunked"], b"zz\r\nnot a chunk\r\n"), 400),
            (crashes, request("GET", "/"), 500)]:
        head, _blank, body = serve_one_connection(handler_class, application, data).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d" % status), head
        assert b"application/json" in head and json.loads(body)["error"]


# -- gunicorn ------------------------------------------------------------------------------------

def test_chattle_worker_serves_through_chattles_handler(tmp_path):
    """gunicorn with gunicorn.conf.py runs ChattleWorker: a head only chattle_http refuses
    this way (a JSON 431 for a header over the count) proves whose handler answered."""
    server = ChattleServer(gunicorn=True, log_path=str(tmp_path / "gunicorn.log"))
    try:
        client = Raw(server.port)
        try:
            client.sock.sendall(request("GET", "/health", ["X-H%d: v" % number for number in range(101)]))
            status, headers, body = client.answer()
        finally:
            client.close()
        assert status == 431 and "request headers are over the limit" in body["error"]
        assert headers["connection"] == "close"
    finally:
        server.stop()


# -- the access log ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["python", "gunicorn"])
def test_the_access_log_path_with_a_log_on(tmp_path, kind):
    log_path = tmp_path / ("%s.log" % kind)
    env = {"CHATTLE_ACCESS_LOG": "1", "CHATTLE_GUNICORN_ACCESSLOG": "-"}
    server = ChattleServer(gunicorn=kind == "gunicorn", env=env, log_path=str(log_path))
    try:
        assert get_json(server.url + "/rooms/logged/msgs?since=0&timeout=0")[0] == 200
        client = Raw(server.port)
        try:
            client.sock.sendall(request("GET", "/health", ["X-H%d: v" % number for number in range(101)]))
            assert client.answer()[0] == 431
        finally:
            client.close()
        # the log line is written after the answer is sent
        wait_until(lambda: "431" in log_path.read_text() and " 200 " in log_path.read_text(), GENEROUS,
                   "both requests in the access log")
    finally:
        server.stop()
    log = log_path.read_text()
    assert "GET /rooms/logged/msgs?since=0&timeout=0 HTTP/1.1" in log and " 200 " in log
    assert "431" in log  # the refused head is reported too, on one line
    assert "Traceback" not in log and "Error" not in log.replace("error", "")
