"""The Debian packages a make target needs: install the missing ones, or say in one line how.

    python3 -m harness.system_packages --for-goals "load" --workers 2   # what make load WORKERS=2 needs
    python3 -m harness.system_packages redis-server chromium            # these programs

Which programs each make goal needs is decided here, once (GOALS): the Makefile's
system-packages target, which the goals that need programs depend on, calls this with
its goals and the make variables that matter; `make run` and `make load` ask the same
table again before they start anything (bench.sweep and bench.capacity check for
redis-server by the servers they will start). .ci/run names its programs. It needs only
the standard library, so it runs before the virtualenv exists. A program that is present
costs nothing. A missing one is installed with `apt-get` when running as root, or with
`sudo -n apt-get` when sudo works without a password; sudo is never asked for one.
Otherwise it stops at once with one line that names the exact command to run. The
harness's own code finds its programs here too, so a path is written down once.
"""

import argparse
import os
import shutil
import subprocess
import sys

###############################################################################
# What the harness runs, where it looks for it, and which package provides it
###############################################################################

PROGRAMS = {
    # program: (a name looked up on PATH, or an absolute path; the Debian package)
    "redis-server": ("redis-server", "redis-server"),
    # playwright is pointed at Debian's browser and never downloads one of its own
    "chromium": ("/usr/bin/chromium", "chromium"),
    # .ci/run needs make before it can run make
    "make": ("make", "make"),
    # the instruction-count gate of make regress, which make test runs
    "valgrind": ("valgrind", "valgrind"),
    # the cluster test and make cluster-demo: a load host whose wall clock is 2 s ahead
    "faketime": ("faketime", "faketime"),
    # make run MONITOR=1 and the /metrics test: a real Prometheus scraping the server
    "prometheus": ("/usr/bin/prometheus", "prometheus"),
    # PROXY=nginx in front of the server (harness/proxy.py), and the C peer of make bench and make
    # capacity (PEERS=nchan): nginx and Debian's Nchan module
    "nginx": ("/usr/sbin/nginx", "nginx"),
    "nchan": ("/usr/lib/nginx/modules/ngx_nchan_module.so", "libnginx-mod-nchan"),
}


def several(workers):
    """WORKERS as make passes it ("2", "1,2,4", "" or an int): more than one worker somewhere."""
    return any(int(count) > 1 for count in str(workers).split(",") if count.strip().isdigit())


def _proxy(given):
    """PROXY=nginx: nginx in front of the server this goal starts."""
    return ["nginx"] if given["proxy"] == "nginx" else []


def _needs_for_load(given):
    """make load: a redis-server for gunicorn's bus or a local cluster, nginx in front with
    PROXY=nginx; none of them for a server elsewhere."""
    if given["host"]:
        return []
    if given["redis_cluster"]:
        return (["redis-server"] if given["redis_cluster"] == "local" else []) + _proxy(given)
    return (["redis-server"] if several(given["workers"]) else []) + _proxy(given)


def _peer_programs(given):
    """make bench and make capacity: nginx with Nchan when PEERS names it (or is 1: every peer)."""
    peers = [peer.strip() for peer in given["peers"].split(",")]
    return ["nginx", "nchan"] if "nchan" in peers or "1" in peers else []


def _test_programs(given):
    # faketime only as root: the cluster test it serves makes network namespaces; nginx and Nchan
    # for the C peer's test (a small run through the real nginx); prometheus for the /metrics test
    return (["redis-server", "chromium", "valgrind", "prometheus", "nginx", "nchan"]
            + (["faketime"] if given["root"] else []))


GOALS = {
    # make goal: the programs it needs, given the make variables (WORKERS, REDIS, REDIS_CLUSTER,
    # HOST, PEERS, PROXY, MONITOR) and whether it runs as root; a goal not listed needs none
    "all": _test_programs,
    "test": _test_programs,
    "test-long": _test_programs,
    "test-fast": lambda given: ["redis-server"],
    "bench": lambda given: ["redis-server"] + _peer_programs(given),
    "capacity": lambda given: ["redis-server"] + _peer_programs(given),
    "cluster-demo": lambda given: ["redis-server", "faketime"],
    "redis-cluster": lambda given: ["redis-server"],
    # one worker serves from memory; more share a bus: REDIS=, REDIS_CLUSTER=, else a local redis-server;
    # MONITOR=1: a Prometheus scraping it; PROXY=nginx: nginx in front
    "run": lambda given: (["redis-server"] if several(given["workers"]) and not (
        given["redis"] or given["redis_cluster"]) else []) + (["prometheus"] if given["monitor"] else [])
    + _proxy(given),
    "load": _needs_for_load,
    "load-calibrate": _needs_for_load,
    "soak": lambda given: ["redis-server"] if several(given["workers"]) else [],
    "regress": lambda given: ["valgrind"],
    "regress-accept": lambda given: ["valgrind"],
}


def needed(goals, workers=1, redis="", redis_cluster="", host="", root=None, monitor="", peers="", proxy=""):
    """The programs `goals` need, sorted, once each."""
    given = {"workers": workers, "redis": redis or "", "redis_cluster": redis_cluster or "", "host": host or "",
             "root": os.geteuid() == 0 if root is None else root, "monitor": str(monitor or "") not in ("", "0"),
             "peers": peers or "", "proxy": proxy or ""}
    return sorted({program for goal in goals if goal in GOALS for program in GOALS[goal](given)})


APT_DEADLINE = 1200  # seconds for `apt-get install`: chromium is a large download
SUDO_PROBE_DEADLINE = 10


def find(program, look_for=None):
    """Where `program` is, or None. `look_for` overrides where it is looked for."""
    where = (look_for or {}).get(program) or PROGRAMS[program][0]
    if os.path.isabs(where):
        # a module nginx loads is read, not run
        usable = os.access(where, os.R_OK if where.endswith(".so") else os.X_OK)
        return where if os.path.isfile(where) and usable else None
    return shutil.which(where)


def missing(programs, look_for=None):
    return [program for program in programs if find(program, look_for) is None]


def packages_of(programs):
    return sorted({PROGRAMS[program][1] for program in programs})


def install_command(programs):
    """The command a person runs to install what `programs` need."""
    return "sudo apt-get install -y " + " ".join(packages_of(programs))


def missing_line(programs):
    """The one line said when `programs` are missing and cannot be installed from here."""
    names = " and ".join(programs)
    return "%s %s not installed; install %s with: %s" % (
        names, "is" if len(programs) == 1 else "are", "it" if len(programs) == 1 else "them",
        install_command(programs))


class MissingProgram(FileNotFoundError):
    """A system program the harness needs is not installed; str() is the one line to show."""

    def __init__(self, programs):
        super().__init__(missing_line(programs))
        self.programs = programs


def require(programs, look_for=None):
    """Raise MissingProgram naming every one of `programs` that is not installed."""
    absent = missing(programs, look_for)
    if absent:
        raise MissingProgram(absent)


def require_or_exit(programs, command):
    """For a command's main(), before it makes anything: one line and exit 1, no traceback."""
    try:
        require(programs)
    except MissingProgram as error:
        raise SystemExit("%s: %s" % (command, error)) from None


###############################################################################
# Installing: apt-get as root, sudo -n apt-get where that works, never a prompt
###############################################################################

def apt_prefix():
    """The argv prefix that runs apt-get without asking anyone anything, or None."""
    if shutil.which("apt-get") is None:
        return None
    if os.geteuid() == 0:
        return ["apt-get"]
    if shutil.which("sudo") is None:
        return None
    try:
        probe = subprocess.run(["sudo", "-n", "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=SUDO_PROBE_DEADLINE)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return ["sudo", "-n", "apt-get"] if probe.returncode == 0 else None


def install_steps(prefix, programs):
    return [prefix + ["update", "-qq"],
            prefix + ["install", "-y", "-qq", "--no-install-recommends", *packages_of(programs)]]


def ensure(programs, look_for=None, dry_run=False, out=sys.stdout):
    """Install what is missing of `programs`; None when they are all there, else the one
    line that says why not."""
    absent = missing(programs, look_for)
    if not absent:
        return None
    prefix = apt_prefix()
    if prefix is None:
        return missing_line(absent)
    steps = install_steps(prefix, absent)
    print("chattle: installing %s with %s" % (" ".join(packages_of(absent)), " ".join(prefix)), file=out, flush=True)
    if dry_run:
        for step in steps:
            print("would run: " + " ".join(step), file=out)
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for step in steps:
        try:
            code = subprocess.run(step, stdin=subprocess.DEVNULL, env=env, timeout=APT_DEADLINE).returncode
        except subprocess.TimeoutExpired:
            code = "timed out after %ds" % APT_DEADLINE
        if code != 0:
            return "`%s` failed (%s); %s" % (" ".join(step), code, missing_line(absent))
    still = missing(absent, look_for)
    return missing_line(still) if still else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("programs", nargs="*", metavar="PROGRAM",
                        help="programs needed, of: %s" % ", ".join(sorted(PROGRAMS)))
    parser.add_argument("--for-goals", default="", metavar="GOALS",
                        help="and those these make goals need (space-separated: make's MAKECMDGOALS), of: %s"
                             % ", ".join(sorted(GOALS)))
    parser.add_argument("--workers", default="1", help="make's WORKERS")
    parser.add_argument("--redis", default="", help="make's REDIS")
    parser.add_argument("--redis-cluster", default="", help="make's REDIS_CLUSTER")
    parser.add_argument("--host", default="", help="make's HOST")
    parser.add_argument("--monitor", default="", help="make's MONITOR")
    parser.add_argument("--peers", default="", help="make's PEERS")
    parser.add_argument("--proxy", default="", help="make's PROXY")
    parser.add_argument("--list", action="store_true", help="print the programs needed, one line, and install nothing")
    parser.add_argument("--look-for", action="append", default=[], metavar="PROGRAM=PATH",
                        help="look for PROGRAM at PATH instead (tests use it)")
    parser.add_argument("--dry-run", action="store_true", help="print the install commands instead of running them")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.programs) - set(PROGRAMS))
    if unknown:
        parser.error("no such program: %s (known: %s)" % (", ".join(unknown), ", ".join(sorted(PROGRAMS))))
    programs = list(dict.fromkeys(args.programs + needed(args.for_goals.split(), args.workers, args.redis,
                                                         args.redis_cluster, args.host, monitor=args.monitor,
                                                         peers=args.peers, proxy=args.proxy)))
    if args.list:
        print(" ".join(programs))
        return 0
    look_for = dict(item.split("=", 1) for item in args.look_for)
    problem = ensure(programs, look_for, dry_run=args.dry_run)
    if problem:
        print("chattle: " + problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
