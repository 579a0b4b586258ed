"""Shared fixtures: real servers on loopback, a real redis-server, an in-process WSGI caller.

The test process imports chattle, which patches the standard library with gevent; doing
it here first keeps every test module on the same, patched footing.
"""

from gevent import monkey

monkey.patch_all()

import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import chattle  # noqa: E402
from harness import system_packages  # noqa: E402
from harness.processes import ChattleServer, RedisServer  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_program(program):
    """Where a system program of harness.system_packages is. `make test` installs them
    first; run without make, a missing one skips loudly, and under CI it fails."""
    found = system_packages.find(program)
    if not found:
        message = system_packages.missing_line([program])
        if IN_CI:
            pytest.fail("CI=true and " + message, pytrace=False)
        pytest.skip(message)
    return found


# -- in-process WSGI --------------------------------------------------------------------------

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


@pytest.fixture
def app_state():
    """A fresh in-memory chattle (rooms and bus) for each in-process test."""
    chattle.configure(chattle.Settings(history=50, poll_timeout=25))
    yield chattle
    chattle.configure(chattle.Settings())


@pytest.fixture
def wsgi(app_state):
    return call_wsgi


# -- real processes -----------------------------------------------------------------------------

@pytest.fixture
def redis_server(tmp_path):
    require_program("redis-server")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir=str(workdir), appendonly=True)
    yield server
    server.stop()


@pytest.fixture
def start_chattle(tmp_path):
    """Factory: start a real Chattle server process; every one started is stopped after the test."""
    started = []

    def start(**options):
        options.setdefault("log_path", str(tmp_path / ("server-%d.log" % len(started))))
        server = ChattleServer(**options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
