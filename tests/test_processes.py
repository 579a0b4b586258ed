"""harness/processes.py: what the harness starts, it stops, also when it is interrupted."""

import pytest

from harness.processes import ChattleServer, Process


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
