"""`make cluster-demo`: several hosts made of network namespaces on this machine, and one
`make load` across them, so the multi-host harness is tried on real sockets between
real network stacks:

- host A: redis-server and Chattle under gunicorn with 2 workers on it;
- host B: one Chattle worker sharing A's Redis;
- host C: Locust workers whose wall clock runs 2 s ahead (Debian's `faketime`, the
  monotonic clock left true), so the offset correction has something to correct;
- host D: Locust workers on the true clock (faketime with no shift, so they pay what C
  pays for it): the unskewed run to compare C with, in the same run, receiving the same
  fan-outs at the same moments;
- the root namespace: the Locust master (`make load REMOTE_WORKERS=2 MASTER_BIND=...`).

The hosts hang off one bridge that lives in a namespace of its own; the root namespace
joins it with one veth pair on a private /24, so all traffic stays on links created
here. Every name carries this process's pid, and everything is torn down at the end,
also on failure, timeout or Ctrl-C: the processes inside our namespaces by pid, then
the namespaces (their interfaces go with them). Needs root and `ip`.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from harness.processes import ROOT, CleanUp, Process, free_port, get_json, wait_until
from instruments.measures import softirq_counts, tree_cpu_seconds
from instruments.page import REPORTS_ROOT
from instruments.provenance import git

SERVER_PORT = 8080
REDIS_PORT = 6379
CLOCK_AHEAD = "+2s"           # host C's wall clock, for faketime
# libfaketime's settings for the load hosts. Only the wall clock is shifted: the monotonic
# clock stays true, so libfaketime has nothing to convert in a wait on a monotonic
# condition variable. Its "monotonic fix" (on by default with this glibc) converts such
# waits all the same, and wrongly: they return at once, so CPython's GIL hand-off (a 5 ms
# timed wait on a monotonic condition) spins, and every answer a thread-pool thread sees
# ready waited tens of milliseconds for the GIL, read as client lag (docs/results.md
# "Clocks across hosts"; tests/harness/test_load_cluster.py checks the wait).
FAKETIME_ENV = {"FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_FORCE_MONOTONIC_FIX": "0"}
MONOTONIC_FIX = {"off": FAKETIME_ENV,   # --monotonic-fix default: libfaketime's own choice, to measure what it costs
                 "default": {name: value for name, value in FAKETIME_ENV.items()
                             if name != "FAKETIME_FORCE_MONOTONIC_FIX"}}
IP_DEADLINE = 10              # seconds for one `ip` command
RUN_MARGIN = 120              # seconds beyond the stage table for start-up, settling and the report


def namespaces_unavailable():
    """None when network namespaces can be made here; else why not, in one line."""
    if os.geteuid() != 0:
        return "network namespaces need root (this runs as uid %d)" % os.geteuid()
    for program in ("ip", "faketime", "redis-server"):
        if shutil.which(program) is None:
            return "`%s` is not installed (apt-get install %s)" % (
                program, {"ip": "iproute2"}.get(program, program))
    probe = "chprobe%d" % os.getpid()
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=IP_DEADLINE)
    if made.returncode != 0:
        return "`ip netns add` failed: %s" % made.stderr.strip()
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=IP_DEADLINE)
    return None


class Topology:
    """Namespaces, a bridge and addresses; processes started in a host; all torn down by close()."""

    def __init__(self, hosts=("a", "b", "c", "d")):
        pid = os.getpid()
        self.tag = "ch%d" % (pid % 100000)                  # interface names stay within 15 characters
        self.prefix = "10.%d.%d" % (200 + pid // 256 % 50, pid % 256)
        self.hosts = hosts
        self.namespace = {host: "%s-%s" % (self.tag, host) for host in hosts}
        self.switch = "%s-sw" % self.tag
        self.address = {"root": self.prefix + ".1"}
        self.address.update({host: "%s.%d" % (self.prefix, index + 2) for index, host in enumerate(hosts)})
        self.processes = []
        self.made = []          # namespaces created, torn down in reverse
        self.root_link = None

    def ip(self, *args, namespace=None):
        argv = ["ip"] + (["-n", namespace] if namespace else []) + list(args)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=IP_DEADLINE)
        if done.returncode != 0:
            raise RuntimeError("%s: %s" % (" ".join(argv), done.stderr.strip()))

    def build(self):
        self.ip("netns", "add", self.switch)
        self.made.append(self.switch)
        self.ip("link", "add", "br0", "type", "bridge", namespace=self.switch)
        self.ip("link", "set", "br0", "up", namespace=self.switch)
        for host in self.hosts:
            namespace = self.namespace[host]
            self.ip("netns", "add", namespace)
            self.made.append(namespace)
            inside, port = "%s%s" % (self.tag, host), "%s%sp" % (self.tag, host)
            self.ip("link", "add", inside, "type", "veth", "peer", "name", port)
            self.ip("link", "set", inside, "netns", namespace)
            self.ip("link", "set", port, "netns", self.switch)
            self.ip("link", "set", port, "master", "br0", "up", namespace=self.switch)
            self.ip("addr", "add", self.address[host] + "/24", "dev", inside, namespace=namespace)
            self.ip("link", "set", inside, "up", namespace=namespace)
            self.ip("link", "set", "lo", "up", namespace=namespace)
        self.root_link = "%sr" % self.tag
        self.ip("link", "add", self.root_link, "type", "veth", "peer", "name", self.root_link + "p")
        self.ip("link", "set", self.root_link + "p", "netns", self.switch)
        self.ip("link", "set", self.root_link + "p", "master", "br0", "up", namespace=self.switch)
        self.ip("addr", "add", self.address["root"] + "/24", "dev", self.root_link)
        self.ip("link", "set", self.root_link, "up")
        return self

    def start(self, host, argv, log_path, env=None):
        """A process in `host`'s namespace, under a host name of its own (reports name load
        workers by host). ip netns exec, unshare and sh each exec the next: its pid is the program's."""
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
        full_env.update(env or {})
        process = Process(["ip", "netns", "exec", self.namespace[host], "unshare", "--uts", "sh", "-c",
                           'hostname "$0" && exec "$@"', "host-" + host, *argv], env=full_env, log_path=log_path,
                          own_session=True)
        self.processes.append(process)
        return process

    def close(self):
        """Stop what runs in our namespaces (by pid: every process in them is ours), then delete them."""
        for process in reversed(self.processes):
            try:
                process.stop(grace=5)
            except Exception as exc:  # noqa: BLE001  (the rest must still go)
                print("cluster: could not stop pid %d: %s" % (process.pid, exc), file=sys.stderr)
        for namespace in reversed(self.made):
            for _ in range(2):
                listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True,
                                        timeout=IP_DEADLINE)
                for pid in listed.stdout.split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                if not listed.stdout.strip():
                    break
                time.sleep(0.2)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=IP_DEADLINE)
        if self.root_link:
            # deleting the switch namespace took its end of the pair, and with it this one
            subprocess.run(["ip", "link", "del", self.root_link], capture_output=True, timeout=IP_DEADLINE)
        self.made, self.processes = [], []


# -- the run ----------------------------------------------------------------------------------------

def python_argv(module, *args):
    return [sys.executable, "-m", module, *args]


def run_cluster(users, duration, report_root, work_dir, processes_per_host=1, burst_gap=0.25, rooms=15,
                faketime_env=FAKETIME_ENV):
    """The posting pattern is set for comparing hosts C and D: single posts (no burst whose
    later messages find listeners still re-polling, a client's speed showing up as latency)
    into many small rooms, an odd number of them so every room has listeners on both
    servers (listener n polls server n % 2 and room n % rooms): in a small fan-out where
    a listener stands in the wake order hardly moves its latency."""
    """Build the topology, run a load across it, tear it down; (exit code of make load, report
    dir or None, {"server_cpu_s": {host: CPU seconds of its processes during the load},
    "softirqs": {kind: [count per CPU during the load]}})."""
    os.makedirs(work_dir, exist_ok=True)
    topology = Topology()
    master = None
    servers = {}
    try:
        topology.build()
        addr = topology.address
        redis_url = "redis://%s:%d/0" % (addr["a"], REDIS_PORT)
        redis_dir = os.path.join(work_dir, "redis")
        os.makedirs(redis_dir, exist_ok=True)
        topology.start("a", [shutil.which("redis-server"), "--bind", addr["a"], "--port", str(REDIS_PORT),
                             "--save", "", "--appendonly", "no", "--protected-mode", "no", "--dir", redis_dir,
                             "--maxclients", "10000"], os.path.join(work_dir, "redis.log"))
        for host, workers in (("a", 2), ("b", 1)):
            server = topology.start(host, python_argv("harness.run_server", "--bind", addr[host], "--port",
                                                      str(SERVER_PORT), "--workers", str(workers), "--redis",
                                                      redis_url), os.path.join(work_dir, "server-%s.log" % host))
            servers[host] = server
            url = "http://%s:%d" % (addr[host], SERVER_PORT)
            wait_until(lambda url=url: get_json(url + "/health", timeout=1)[0] == 200, 60,
                       "chattle on host %s (%s)" % (host, url), server)
        servers["redis"] = topology.processes[0]
        hosts = ",".join("http://%s:%d" % (addr[host], SERVER_PORT) for host in ("a", "b"))
        cpu_before = {name: tree_cpu_seconds(process.pid) for name, process in servers.items()}
        softirqs_before = softirq_counts()
        master_port = free_port(addr["root"])
        master = Process(python_argv("loadtests.run", "--host", hosts, "--remote-workers",
                                     str(2 * processes_per_host), "--master-bind", addr["root"],
                                     "--master-port", str(master_port), "--users", str(users), "--duration",
                                     str(duration), "--spawn-rate", str(max(50, users)), "--burst-gap",
                                     str(burst_gap), "--burst-size", "1", "--rooms", str(rooms), "--worker-wait", "60",
                                     "--report-root", report_root),
                         env=dict(os.environ, PYTHONPATH=ROOT), log_path=os.path.join(work_dir, "master.log"),
                         own_session=True)
        worker_argv = python_argv("loadtests.worker", "--master", addr["root"], "--master-port", str(master_port),
                                  "--processes", str(processes_per_host))
        # D runs under faketime too, with no shift: libfaketime makes every clock read dearer,
        # and a slower client re-polls later and waits further back in the next fan-out, so
        # only a control that pays the same costs isolates what the clock skew does.
        for host, shift in (("c", CLOCK_AHEAD), ("d", "+0s")):
            topology.start(host, ["faketime", "-m", "-f", shift, *worker_argv],
                           os.path.join(work_dir, "workers-%s.log" % host), env=faketime_env)
        deadline = time.monotonic() + duration + RUN_MARGIN
        while master.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        if master.alive():
            raise RuntimeError("the run did not end within %gs\n%s" % (duration + RUN_MARGIN, master.log_tail()))
        code = master.popen.returncode
        softirqs = {kind: [after - before for after, before in zip(counts, softirqs_before[kind])]
                    for kind, counts in softirq_counts().items()}
        figures = {"server_cpu_s": {name: tree_cpu_seconds(process.pid) - cpu_before[name]
                                    for name, process in servers.items()}, "softirqs": softirqs}
        report_dir = None
        with open(master.log_path) as log:
            for line in log:
                if line.startswith("load: report in "):
                    report_dir = line.split("load: report in ", 1)[1].strip()
        return code, report_dir, figures
    finally:
        if master is not None:
            master.stop(grace=30)
        topology.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000, help="listeners, spread over hosts A and B")
    parser.add_argument("--duration", type=float, default=45, help="seconds of the stage table")
    parser.add_argument("--processes", type=int, default=1, help="Locust worker processes on each load host")
    parser.add_argument("--report-root", default=REPORTS_ROOT)
    parser.add_argument("--monotonic-fix", choices=sorted(MONOTONIC_FIX), default="off",
                        help="libfaketime's monotonic fix on the load hosts: off (the demo's), or libfaketime's "
                             "default, to see what it costs the client (default %(default)s)")
    args = parser.parse_args(argv)
    problem = namespaces_unavailable()
    if problem:
        print("cluster-demo: %s" % problem, file=sys.stderr)
        return 2
    work_dir = os.path.join(args.report_root, "cluster-%d" % os.getpid())
    with CleanUp.armed():  # a SIGTERM takes Ctrl-C's way: the namespaces are torn down
        code, report_dir, figures = run_cluster(args.users, args.duration, args.report_root, work_dir,
                                                args.processes, faketime_env=MONOTONIC_FIX[args.monotonic_fix])
    with open(os.path.join(work_dir, "master.log")) as log:
        print(log.read())
    if report_dir:
        with open(os.path.join(report_dir, "summary.json")) as summary_file:
            summary = json.load(summary_file)
        for clock in summary["clocks"]:
            print("cluster-demo: %s is %+.1f ms +- %.2f ms off %s" % (clock["host"], clock["offset"] * 1000,
                                                                    clock["bound"] * 1000, clock["server"]))
        record = demo_record(summary, figures, args.users, args.duration, args.monotonic_fix, commit_of_this_tree())
        for line in harness_lines(record):
            print("cluster-demo: " + line)
        path = os.path.join(work_dir, "cluster-demo.json")
        with open(path, "w") as out:
            json.dump({"runs": [record]}, out, indent=1)
        print("cluster-demo: the run's record in %s (python -m results.clocks renders it)" % path)
    return code


def commit_of_this_tree():
    """The commit checked out here, "+changes" when the tree differs from it."""
    commit = git("rev-parse", "HEAD", check=False) or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no", check=False) else "")


def demo_record(summary, figures, users, duration, monotonic_fix, commit):
    """The run's figures as docs/runs/cluster-demo.json keeps them: the server's latency, the
    client's lag and what each load worker, server host and CPU did (plain data in and out)."""
    def quantiles(figure):
        return {"p50": figure.get("p50"), "p99": figure.get("p99")}
    return {
        "command": "make cluster-demo USERS=%d DURATION=%g" % (users, duration)
                   + (" (python -m loadtests.cluster_demo --monotonic-fix %s)" % monotonic_fix
                      if monotonic_fix != "off" else ""),
        "started": summary["run"]["started"], "commit": commit, "machine": summary["machine_line"],
        "other_processes_cpu_percent": summary.get("other_processes_cpu_mean"),
        "users": users, "duration": duration, "monotonic_fix": monotonic_fix,
        "passed": summary["passed"], "client_bound": summary["client_bound"],
        "posts": summary["posts"], "deliveries": summary["deliveries"], "lost": summary["delivery"]["lost"],
        "wakeup_s": quantiles(summary["wakeup_latency_s"]), "lag_s": quantiles(summary["client_lag_s"]),
        "load_cpu_s": summary["cpu"].get("client_cpu_s"), "server_cpu_s": figures["server_cpu_s"],
        "softirqs": figures["softirqs"],
        "workers": [{"host": share["host"], "wakeup_s": quantiles(share["latency"]),
                     "lag_s": quantiles(share.get("lag") or {}), "cpu_s": share["cpu_seconds"],
                     "timed_wait_early_s": share.get("timed_wait_early")}
                    for share in summary["worker_shares"].values()],
        "clocks": [{"host": clock["host"], "server": clock["server"], "offset": clock["offset"],
                    "bound": clock["bound"]} for clock in summary["clocks"]],
    }


def harness_lines(record):
    """Where the time of a run across hosts went, apart from the server's latency: each
    load worker's lag and CPU, the servers' CPU, the network softirqs per CPU."""
    from instruments.measures import ms
    lines = ["load worker on %s: client lag p50 %s, p99 %s; %s s CPU%s" % (
        worker["host"], ms(worker["lag_s"]["p50"], "%.1f ms"), ms(worker["lag_s"]["p99"], "%.1f ms"),
        "-" if worker["cpu_s"] is None else "%.1f" % worker["cpu_s"],
        "; its timed waits return %.1f ms early (libfaketime's monotonic fix)" % (worker["timed_wait_early_s"] * 1000)
        if worker.get("timed_wait_early_s") else "") for worker in record["workers"]]
    lines.append("CPU during the load: servers %s; load generator (Locust master and workers, orchestrator) %s s" % (
        ", ".join("%s %.1f s" % (host, seconds) for host, seconds in sorted(record["server_cpu_s"].items())),
        "-" if record["load_cpu_s"] is None else "%.1f" % record["load_cpu_s"]))
    lines.append("network softirqs during the load (every process on this machine): %s" % "; ".join(
        "%s %s" % (kind, " / ".join("CPU%d %d" % (cpu, count) for cpu, count in enumerate(counts)))
        for kind, counts in sorted(record["softirqs"].items())))
    return lines


if __name__ == "__main__":
    sys.exit(main())
