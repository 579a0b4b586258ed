"""harness/processes.py: what the harness starts, it stops, also when it is interrupted."""

import os
import signal
import subprocess
import sys

import pytest

from harness.processes import ChattleServer, Process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_server_interrupted_while_it_starts_is_stopped(monkeypatch):
    # make run or make load stopped (Ctrl-C, SIGTERM) before the server answered /health:
    # the child it had already started must not be left running
    started = []
    spawn = Process.__init__

    def remember(self, *args, **kwargs):
        spawn(self, *args, **kwargs)
        started.append(self)

    def interrupted(_self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Process, "__init__", remember)
    monkeypatch.setattr(ChattleServer, "healthy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ChattleServer()
    assert len(started) == 1 and not started[0].alive(), "the half-started server was left running"


def test_a_server_starts_from_bytecode_even_where_none_is_written(tmp_path, cannot_run):
    # A fresh git worktree (a comparison's base) with PYTHONDONTWRITEBYTECODE set: compiled
    # from source at start-up, its held polls measured 10 % less memory each than the same
    # code started from bytecode. The harness compiles a server's modules before it starts.
    if not os.path.exists(os.path.join(ROOT, ".git")):
        cannot_run("a worktree needs a git checkout")
    tree = tmp_path / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), "HEAD"], cwd=ROOT, check=True,
                   capture_output=True, timeout=60)
    try:
        assert not (tree / "__pycache__").exists()
        server = ChattleServer(root=str(tree), env={"PYTHONDONTWRITEBYTECODE": "1"})
        server.stop()
        tag = sys.implementation.cache_tag
        for module in ("chattle_rooms", "chattle_bus", "chattle_redis", "chattle_cluster", "chattle_http",
                       "chattle_request", "chattle_limits"):
            assert (tree / "__pycache__" / ("%s.%s.pyc" % (module, tag))).exists(), module
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True, timeout=60)


def test_a_process_that_ends_and_is_reaped_while_being_stopped_is_stopped_without_an_error():
    """alive() said yes, then the process ended and something else reaped it (gevent's
    child watcher does, in a patched caller) before the signal went: ProcessLookupError,
    which a Ctrl-C's clean-up must not raise."""
    process = Process([sys.executable, "-c", "pass"], log_path=None)
    os.waitpid(process.pid, 0)           # ended and reaped behind Popen's back

    class StillThoughtAlive(Process):
        def alive(self):
            return True
    process.__class__ = StillThoughtAlive
    process.signal(signal.SIGTERM)
    assert process.stop(grace=1) is not None
