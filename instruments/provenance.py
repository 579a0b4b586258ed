"""What a measured server ran: a revision of this repository (git) and the CHATTLE_BENCH_*
variables that change what it does (harness/bench_server.py installs what they ask for;
the product never reads them). A figure means nothing without both, so every command
that records, compares or starts a server asks here.

`provenance()` is what a published figure names (docs/results.md): the command as run, the
date, the commit of the tree measured and the machine. Every command whose JSON a results
entry is made from writes it under the key "provenance".
"""

import datetime
import os
import platform
import subprocess
import sys

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


def cpu_model():
    """The processor's name as /proc/cpuinfo gives it (else what platform knows)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line(argv=None):
    """The command as run: `python -m <module> <args>` for a module run with -m (the path in
    sys.argv[0] names the module), else the argv as given."""
    argv = list(sys.argv if argv is None else argv)
    path = os.path.abspath(argv[0]) if argv else ""
    if path.startswith(ROOT + os.sep) and path.endswith(".py"):
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        return " ".join(["python -m " + module] + argv[1:])
    return " ".join(argv)


def load_average():
    """The 1-minute load average: how busy the machine (every process on it) was."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def provenance(command=None, started=None, root=ROOT):
    """{command, date, commit, dirty, machine, load_average}: what a published figure names.
    `started`: the run's start (a UNIX time; now if not given) is the date; the commit is
    the tree's when this is asked, so ask at the start of a long run."""
    from instruments.page import machine_line

    commit = git("rev-parse", "HEAD", cwd=root, check=False)
    dirty = git("status", "--porcelain", "--untracked-files=no", cwd=root, check=False)
    when = datetime.datetime.fromtimestamp(started if started is not None else
                                           datetime.datetime.now().timestamp(), datetime.timezone.utc)
    return {"command": command or command_line(), "date": when.strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit, "dirty": bool(dirty) if commit else None,
            "machine": "%s, %s" % (cpu_model(), machine_line()), "load_average": load_average(),
            "bench_environment": bench_environment()}
