"""What a measured server ran: a revision of this repository (git) and the CHATTLE_BENCH_*
variables that change what it does (harness/bench_server.py installs what they ask for;
the product never reads them). A figure means nothing without both, so every command
that records, compares or starts a server asks here.
"""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_PREFIX = "CHATTLE_BENCH_"


class GitFailed(RuntimeError):
    """git could not answer; the message is its own."""


def git(*args, cwd=ROOT, check=True, timeout=120, env=None):
    """git's output, stripped. When git fails: GitFailed, or None with check=False."""
    try:
        run = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        if check:
            raise GitFailed("git %s: %s" % (" ".join(args), exc))
        return None
    if run.returncode != 0:
        if check:
            raise GitFailed("git %s: %s" % (" ".join(args), (run.stderr or run.stdout).strip()))
        return None
    return run.stdout.strip()


def bench_environment(environ=None):
    """The CHATTLE_BENCH_* variables of `environ` (os.environ), sorted: they change what the
    server does, so they are settings of a run."""
    environ = os.environ if environ is None else environ
    return {name: value for name, value in sorted(environ.items()) if name.startswith(BENCH_PREFIX)}


def without_bench_environment(environ=None):
    """`environ` (os.environ) but its CHATTLE_BENCH_* variables: a server started with it
    runs as the product does."""
    environ = os.environ if environ is None else environ
    return {name: value for name, value in environ.items() if not name.startswith(BENCH_PREFIX)}
