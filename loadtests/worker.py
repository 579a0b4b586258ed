"""`make load-worker MASTER=<addr>`: this host's Locust workers for a `make load` master
on another host (which passes them every option and the stage table's knobs).

One Locust worker process per core by default (`--processes`): each holds its share of
the listeners in one epoll set on one core. It first waits, bounded, for the master's
port to accept a connection; a master that never answers is one line and exit 2, not
a worker retrying forever. Then it runs until the master ends the run.
"""

import argparse
import os
import socket
import sys
import threading
import time

from chattle_limits import raise_descriptor_limit
from harness.processes import ROOT, CleanUp, Process
from loadtests.run import DEFAULT_MASTER_PORT, HERE, LOCUST_CONF, stop_quietly

MASTER_WAIT_SECONDS = 60


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--master", required=True, help="address of the host running `make load REMOTE_WORKERS=k`")
    parser.add_argument("--master-port", type=int, default=DEFAULT_MASTER_PORT, help="the master's Locust port")
    parser.add_argument("--processes", type=int, default=0, help="Locust worker processes (0: one per core)")
    parser.add_argument("--master-wait", type=float, default=MASTER_WAIT_SECONDS,
                        help="seconds to wait for the master to answer before giving up (exit 2)")
    return parser.parse_args(argv)


def master_answers(host, port, wait):
    """True once a TCP connection to the master's port succeeds, False after `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(0.1, wait))):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            # not time.sleep: under libfaketime (the cluster test's skewed host) it fails with EINVAL
            threading.Event().wait(0.5)


def main(argv=None):
    args = parse_args(argv)
    processes = args.processes or os.cpu_count() or 1
    if not master_answers(args.master, args.master_port, args.master_wait):
        print("load-worker: no Locust master answered on %s:%d within %gs (start `make load REMOTE_WORKERS=k "
              "MASTER_BIND=<an address of that host>` there first, and open the port)"
              % (args.master, args.master_port, args.master_wait), file=sys.stderr)
        return 2
    raise_descriptor_limit()  # the forked workers inherit the raised soft limit
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, "-m", "locust", "--config", LOCUST_CONF, "-f", os.path.join(HERE, "locustfile.py"),
            "--worker", "--master-host", args.master, "--master-port", str(args.master_port),
            "--processes", str(processes)]
    print("load-worker: %d Locust worker process(es) for the master on %s:%d" % (processes, args.master,
                                                                              args.master_port), flush=True)
    with CleanUp.armed():  # a SIGTERM takes Ctrl-C's way: the workers are stopped
        worker = Process(argv, env=env, log_path="-", own_session=True)
        try:
            worker.popen.wait()
        except KeyboardInterrupt:
            pass
        finally:
            stop_quietly(worker, 10)
    return worker.popen.returncode or 0


if __name__ == "__main__":
    sys.exit(main())
