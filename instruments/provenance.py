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


def run_provenance(command, root=ROOT):
    """What a published figure names: the command that measured it, when (UTC), on which commit
    (and whether tracked files differed from it), and on what machine (cores, memory, CPU model,
    system). Kept in the run's own JSON, from which docs/results.md's entry is made."""
    import datetime
    import platform

    commit = git("rev-parse", "HEAD", cwd=root, check=False)
    dirty = git("status", "--porcelain", "--untracked-files=no", cwd=root, check=False)
    model = platform.machine()
    memory = None
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
        with open("/proc/meminfo") as info:
            memory = round(int(info.readline().split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    machine = "%d cores (%s), %s GiB, %s" % (os.cpu_count(), model, memory, platform.platform(terse=True))
    return {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit, "dirty": bool(dirty) if commit else None, "machine": machine}
