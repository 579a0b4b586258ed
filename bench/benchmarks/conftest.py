"""Benchmarks of the broadcast path, for people reading pytest-benchmark's tables
(`make benchmarks`); never collected by `make test`. The gates of
`make regress` are bench/regress.py and bench/ab.py.

CHATTLE_BENCH_EXTRA_WORK=<squares> makes every poll answer of the route do that much
more work in the server process the socket benchmark starts (harness/processes.py
starts it through harness/bench_server.py, which installs it). The in-process
benchmark parks on Room directly, below the routes, so only the socket benchmark sees it.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
