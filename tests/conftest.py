"""Shared fixtures: real servers on loopback, a real redis-server, an in-process WSGI caller.

The test process imports chattle, which patches the standard library with gevent; doing
it here first keeps every test module on the same, patched footing.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import chattle  # noqa: E402
from clients import call_wsgi  # noqa: E402
from harness import system_packages  # noqa: E402
from harness.processes import ChattleServer, RedisServer, SeedGunicorn  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(message):
    """Skip loudly with the reason; under CI=true a test that cannot run is a failure."""
    if IN_CI:
        pytest.fail("CI=true and " + message, pytrace=False)
    pytest.skip(message)


def require_program(program):
    """Where a system program of harness.system_packages is. `make test` installs them
    first; run without make, a missing one skips loudly, and under CI it fails."""
    found = system_packages.find(program)
    if not found:
        skip_or_fail(system_packages.missing_line([program]))
    return found


@pytest.fixture(scope="session")
def cannot_run():
    """skip_or_fail, for test modules (they import nothing from conftest)."""
    return skip_or_fail


@pytest.fixture(scope="session")
def valgrind():
    """valgrind, which the instruction-count gate of make regress runs under."""
    return require_program("valgrind")


# -- in-process WSGI --------------------------------------------------------------------------

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
def chromium():
    """Debian's chromium, the browser playwright drives (it never downloads one of its own)."""
    return require_program("chromium")


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



@pytest.fixture
def seed_gunicorn(tmp_path):
    """Factory: the seed's gunicorn command (harness.processes.SeedGunicorn), with this
    venv's gunicorn or another's; every one started is stopped after the test."""
    started = []

    def start(bin_dir=None):
        log_path = str(tmp_path / ("gunicorn-%d.log" % len(started)))
        started.append(SeedGunicorn(bin_dir=bin_dir, log_path=log_path))
        return started[-1]

    yield start
    for server in started:
        server.stop(grace=20)
