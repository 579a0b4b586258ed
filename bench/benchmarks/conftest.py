"""Benchmarks of the broadcast path, run by `make regress` (never by `make test`).

CHATTLE_BENCH_SLOWDOWN_US=<microseconds> makes every poll answer spin that long first:
the hook that shows the gate fails when the broadcast path gets slower.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import chattle  # noqa: E402

SLOWDOWN_US = float(os.environ.get("CHATTLE_BENCH_SLOWDOWN_US", "0") or 0)


@pytest.fixture(autouse=True)
def injected_slowdown(monkeypatch):
    if SLOWDOWN_US > 0:
        answer = chattle.Room.answer

        def slow_answer(self, since, limit):
            until = time.perf_counter() + SLOWDOWN_US / 1e6
            while time.perf_counter() < until:
                pass  # a busy spin: a sleep would yield and hide the cost
            return answer(self, since, limit)

        monkeypatch.setattr(chattle.Room, "answer", slow_answer)
    yield
