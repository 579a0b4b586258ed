"""What make does when a system program is missing: installs it, or says in one line how.

Nothing here installs or removes a package: `--look-for` points the check at a path
that does not exist, and `--dry-run` prints the apt-get steps instead of running them.
The real remove-and-reinstall is the fresh-machine check of the README.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from harness import system_packages
from harness.processes import ROOT

NOWHERE = "/nonexistent/chattle-test/"
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by an unprivileged user, unlike a venv under /root
DEADLINE = 60


def run_module(args, as_nobody=False, path=None):
    """`python3 -m harness.system_packages ARGS`, as this user or as nobody (no sudo, not root).

    As nobody, from a copy of the module in a directory nobody can read: the checkout may
    be one only its owner can (a clone inside `mktemp -d`, or under /root)."""
    argv = [SYSTEM_PYTHON if as_nobody else sys.executable, "-m", "harness.system_packages", *args]
    env = dict(os.environ, PATH=path or os.environ["PATH"])
    if not as_nobody:
        return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=DEADLINE)
    readable = tempfile.mkdtemp(prefix="chattle-packages-")
    try:
        os.mkdir(os.path.join(readable, "harness"))
        for name in ("__init__.py", "system_packages.py"):
            shutil.copy(os.path.join(ROOT, "harness", name), os.path.join(readable, "harness", name))
        for folder, _dirs, files in os.walk(readable):
            os.chmod(folder, 0o755)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o644)
        argv = ["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups", *argv]
        return subprocess.run(argv, cwd=readable, env=env, capture_output=True, text=True, timeout=DEADLINE)
    finally:
        shutil.rmtree(readable)


def look_nowhere(*programs):
    return [arg for program in programs for arg in ("--look-for", "%s=%s%s" % (program, NOWHERE, program))]


def need_root():
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs root, setpriv and %s to act as an unprivileged user" % SYSTEM_PYTHON)


def test_present_programs_cost_nothing():
    done = run_module(["redis-server", "--look-for", "redis-server=" + sys.executable])
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_missing_and_cannot_install_is_one_line_naming_the_command():
    need_root()
    done = run_module([*look_nowhere("redis-server", "chromium"), "redis-server", "chromium"], as_nobody=True,
                      path="/usr/bin:/bin")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr == ("chattle: redis-server and chromium are not installed; install them with: "
                           "sudo apt-get install -y chromium redis-server\n")


def test_missing_as_root_installs_with_apt_get():
    need_root()
    if not shutil.which("apt-get"):
        pytest.skip("not a Debian system")
    done = run_module([*look_nowhere("redis-server"), "redis-server", "--dry-run"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "chattle: installing redis-server with apt-get",
        "would run: apt-get update -qq",
        "would run: apt-get install -y -qq --no-install-recommends redis-server",
    ]


def test_missing_with_passwordless_sudo_installs_with_sudo_n():
    """A sudo that lets `sudo -n true` through is used as `sudo -n apt-get`, never asked for a password."""
    need_root()
    if not shutil.which("apt-get"):
        pytest.skip("not a Debian system")
    bin_dir = tempfile.mkdtemp(prefix="chattle-sudo-")  # pytest's tmp_path is closed to nobody
    try:
        os.chmod(bin_dir, 0o755)
        sudo = os.path.join(bin_dir, "sudo")
        with open(sudo, "w") as script:
            script.write('#!/bin/sh\n[ "$1" = -n ] || exit 1\nshift\nexec "$@"\n')
        os.chmod(sudo, 0o755)
        done = run_module([*look_nowhere("chromium"), "chromium", "--dry-run"], as_nobody=True,
                          path="%s:/usr/bin:/bin" % bin_dir)
    finally:
        shutil.rmtree(bin_dir)
    assert done.returncode == 0, done.stderr
    assert "would run: sudo -n apt-get install -y -qq --no-install-recommends chromium" in done.stdout


def test_the_harness_finds_its_programs_through_one_table():
    assert system_packages.find("redis-server", {"redis-server": NOWHERE + "redis-server"}) is None
    with pytest.raises(system_packages.MissingProgram, match="sudo apt-get install -y redis-server"):
        system_packages.require(["redis-server"], {"redis-server": NOWHERE + "redis-server"})


# -- commands that need redis-server say so before they make anything ------------------------

def path_without_redis(tmp_path):
    """A PATH with python's tools but no redis-server: an empty directory."""
    empty = tmp_path / "no-redis"
    empty.mkdir()
    return str(empty)


def test_sweep_without_redis_server_is_one_line_and_leaves_no_report(tmp_path):
    reports = os.path.join(ROOT, "reports")
    before = set(os.listdir(reports)) if os.path.isdir(reports) else set()  # a fresh clone has none
    done = subprocess.run([sys.executable, "-m", "bench.sweep", "--quick", "--no-peers"], cwd=ROOT,
                          env=dict(os.environ, PATH=path_without_redis(tmp_path)), capture_output=True,
                          text=True, timeout=DEADLINE)
    assert done.returncode == 1
    assert done.stderr == ("bench: redis-server is not installed; install it with: "
                           "sudo apt-get install -y redis-server\n")
    assert (set(os.listdir(reports)) if os.path.isdir(reports) else set()) == before


def test_load_without_redis_server_refuses_before_its_report(tmp_path):
    root = tmp_path / "reports"
    done = subprocess.run([sys.executable, "-m", "loadtests.run", "--workers", "2", "--report-root", str(root)],
                          cwd=ROOT, env=dict(os.environ, PATH=path_without_redis(tmp_path)),
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 2, done.stderr
    assert "redis-server is not installed; install it with: sudo apt-get install -y redis-server" in done.stderr
    assert "Traceback" not in done.stderr
    assert not root.exists() or not os.listdir(root)


def test_run_without_redis_server_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "harness.run_server", "--workers", "2", "--port", "1"],
                          cwd=ROOT, env=dict(os.environ, PATH=path_without_redis(tmp_path)),
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 1
    assert done.stderr == ("run: redis-server is not installed; install it with: "
                           "sudo apt-get install -y redis-server\n")


# -- which programs a make goal needs: GOALS, decided once ------------------------------------

def test_each_goal_needs_what_it_runs():
    needed = system_packages.needed
    assert needed(["test"], root=False) == ["chromium", "nchan", "nginx", "prometheus", "redis-server", "valgrind"]
    assert needed(["all"], root=True) == ["chromium", "faketime", "nchan", "nginx", "prometheus", "redis-server",
                                          "valgrind"]
    assert needed(["lint", "history", "load-worker"]) == []
    assert needed(["regress"]) == needed(["regress-accept"]) == ["valgrind"]
    assert needed(["bench"]) == needed(["capacity"]) == needed(["test-fast"]) == ["redis-server"]
    for peers in ("nchan", "uvloop,nchan", "1"):
        assert needed(["bench"], peers=peers) == needed(["capacity"], peers=peers) == [
            "nchan", "nginx", "redis-server"]
    assert needed(["capacity"], peers="uvloop,asyncio") == needed(["bench"], peers="0") == ["redis-server"]
    assert needed(["cluster-demo"]) == ["faketime", "redis-server"]
    assert needed(["run"]) == [] and needed(["run"], workers="2") == ["redis-server"]
    assert needed(["run"], workers="2", redis="redis://h:6379/0") == []
    assert needed(["run"], workers=2, redis_cluster="h:1") == []
    assert needed(["run"], monitor="1") == ["prometheus"] and needed(["run"], monitor="0") == []
    assert needed(["load"]) == [] and needed(["load"], workers="2") == ["redis-server"]
    assert needed(["load"], redis_cluster="local") == ["redis-server"]
    assert needed(["load"], workers="2", redis_cluster="h:7000") == []
    assert needed(["load"], workers="2", host="http://h:8080") == []
    assert needed(["soak"], workers="1") == [] and needed(["soak"], workers="2") == ["redis-server"]
    assert needed(["run"], proxy="nginx") == ["nginx"] and needed(["run"], workers="2", proxy="nginx") == [
        "nginx", "redis-server"]
    assert needed(["load"], proxy="nginx") == ["nginx"] and needed(["load"], workers="2", proxy="nginx") == [
        "nginx", "redis-server"]
    assert needed(["load"], proxy="nginx", host="https://h") == []   # a deployment elsewhere has its own


def makefile_goals_needing_programs():
    with open(os.path.join(ROOT, "Makefile")) as makefile:
        text = makefile.read()
    return {target for target, prerequisites in re.findall(r"^([a-z][\w-]*):(?!=)(.*)$", text, re.M)
            if "system-packages" in prerequisites.split()}


def test_the_goals_that_install_programs_are_the_tables():
    assert makefile_goals_needing_programs() == set(system_packages.GOALS) - {"all"}


@pytest.mark.parametrize("variables,programs", [
    (["WORKERS=2"], "redis-server"), (["WORKERS=2", "HOST=http://h:1"], ""), ([], ""),
    (["REDIS_CLUSTER=local"], "redis-server")])
def test_make_hands_the_goals_and_variables_to_the_table(variables, programs):
    """`make -n load ...` prints the system-packages recipe; run with --list, it names what
    make load with those variables needs."""
    done = subprocess.run(["make", "-n", "--no-print-directory", "-C", ROOT, "load", *variables],
                          capture_output=True, text=True, timeout=DEADLINE, env=dict(os.environ, MAKEFLAGS=""))
    assert done.returncode == 0, done.stderr
    recipe = done.stdout.replace("\\\n", " ").splitlines()
    command = next(line for line in recipe if "-m harness.system_packages" in line)
    assert '--for-goals "load"' in command
    listed = subprocess.run(command + " --list", shell=True, cwd=ROOT, capture_output=True, text=True,
                            timeout=DEADLINE)
    assert (listed.returncode, listed.stdout.strip()) == (0, programs), listed.stderr


@pytest.mark.parametrize("goal", ["bench", "capacity"])
def test_make_hands_peers_to_the_table(goal):
    """PEERS=nchan: make bench and make capacity install nginx and its Nchan module."""
    done = subprocess.run(["make", "-n", "--no-print-directory", "-C", ROOT, goal, "PEERS=uvloop,nchan"],
                          capture_output=True, text=True, timeout=DEADLINE, env=dict(os.environ, MAKEFLAGS=""))
    assert done.returncode == 0, done.stderr
    recipe = done.stdout.replace("\\\n", " ").splitlines()
    command = next(line for line in recipe if "-m harness.system_packages" in line)
    listed = subprocess.run(command + " --list", shell=True, cwd=ROOT, capture_output=True, text=True,
                            timeout=DEADLINE)
    assert sorted(listed.stdout.split()) == ["nchan", "nginx", "redis-server"], listed.stderr
    assert any("--peers uvloop,nchan" in line for line in recipe)
