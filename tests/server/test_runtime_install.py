"""A venv holding only the server's runtime dependencies serves `python chattle.py` and
the seed's gunicorn command.

The harness venv cannot show it: its extras pull in packages the server never declared
(gunicorn's gevent worker imports packaging, which came only through them). This venv
gets pyproject.toml's [project] dependencies and nothing else, from pip's configured
index, and is kept between runs under ~/.cache/chattle/, keyed by those dependencies
and the Python version: a changed dependency list builds a new one.
"""

import fcntl
import hashlib
import json
import os
import subprocess
import sys

import pytest

from harness.processes import ROOT, ChattleServer, post_json

pytestmark = pytest.mark.slow

CACHE_ROOT = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chattle",
                          "runtime-venvs")
BUILD_DEADLINE = 600  # seconds for venv + pip install on a cold cache
DONE_MARK = ".complete"


def runtime_dependencies():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as pyproject:
        return tomllib.load(pyproject)["project"]["dependencies"]


def build_runtime_venv(dependencies):
    """The cached venv for `dependencies`, built once (under a lock: test runs may overlap)."""
    key = hashlib.sha256(json.dumps([dependencies, list(sys.version_info[:2])]).encode()).hexdigest()[:16]
    path = os.path.join(CACHE_ROOT, key)
    os.makedirs(CACHE_ROOT, exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(path, DONE_MARK)):
            subprocess.run([sys.executable, "-m", "venv", "--clear", path], check=True, timeout=BUILD_DEADLINE,
                           capture_output=True)
            installed = subprocess.run([os.path.join(path, "bin", "python"), "-m", "pip", "install", "--quiet",
                                        "--disable-pip-version-check", *dependencies],
                                       timeout=BUILD_DEADLINE, capture_output=True, text=True)
            if installed.returncode != 0:
                pytest.fail("pip could not install the runtime dependencies %s:\n%s"
                            % (dependencies, installed.stderr[-3000:]), pytrace=False)
            open(os.path.join(path, DONE_MARK), "w").close()
    return path


@pytest.fixture(scope="module")
def runtime_venv():
    return build_runtime_venv(runtime_dependencies())


def test_the_runtime_venv_holds_no_harness_package(runtime_venv):
    """Otherwise the two tests below could pass on what the harness brought in."""
    probe = subprocess.run([os.path.join(runtime_venv, "bin", "python"), "-c",
                            "import importlib.util as u; print([m for m in ('psutil', 'locust', 'pytest') "
                            "if u.find_spec(m)])"], capture_output=True, text=True, timeout=60, check=True)
    assert probe.stdout.strip() == "[]"


def serves(server):
    status, body = post_json(server.url + "/rooms/runtime/msgs", {"from": "ann", "content": "hi"})
    return status == 201 and body["id"] == 1


def test_python_chattle_py_serves_from_the_runtime_venv(runtime_venv, tmp_path):
    server = ChattleServer(python=os.path.join(runtime_venv, "bin", "python"), log_path=str(tmp_path / "chattle.log"))
    try:
        assert serves(server), server.log_tail()
    finally:
        server.stop()


def test_the_seed_gunicorn_command_serves_from_the_runtime_venv(runtime_venv, seed_gunicorn):
    server = seed_gunicorn(bin_dir=os.path.join(runtime_venv, "bin"))
    assert serves(server), server.log_tail()
