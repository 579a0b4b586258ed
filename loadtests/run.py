"""`make load`: start Chattle, hold thousands of long-polls with Locust, burst posts, and
write a capacity report to reports/<timestamp>-load/.

Preflight first (descriptor limits, gunicorn's worker_connections, timeout ordering, the
stage table), so a run that cannot reach its target says why before it starts. Every
process it starts is stopped by pid at the end, also on Ctrl-C or failure. Exit status:
0 when every check passed, 1 when a check failed, 2 when preflight refused the run.
"""

import argparse
import os
import runpy
import signal
import sys
import threading
import time

from chattle_limits import CLIENT_TIMEOUT_MARGIN, POLL_TIMEOUT_MAX, raise_descriptor_limit
from harness.processes import ROOT, ChattleServer, Process, RedisServer, get_json
from harness.system_packages import missing, missing_line
from loadtests.scenario import build_stages, room_name, stage_at
from reports.page import REPORTS_ROOT, new_report_dir

HERE = os.path.dirname(os.path.abspath(__file__))
LOCUST_CONF = os.path.join(HERE, "locust.conf")
DESCRIPTORS_SPARE = 200       # logs, pipes, the master link, /stats probes


def conf_defaults(path=LOCUST_CONF):
    """key = value lines of locust.conf, so the orchestrator and Locust share one set of defaults."""
    values = {}
    with open(path) as conf:
        for line in conf:
            line = line.split("#", 1)[0].strip()
            if "=" in line:
                key, value = (part.strip() for part in line.split("=", 1))
                values[key] = value
    return values


def parse_args(argv=None):
    conf = conf_defaults()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--users", type=int, default=int(conf["listeners"]),
                        help="listeners holding a long-poll at the target (posters come on top)")
    parser.add_argument("--duration", type=float, default=float(conf["run-seconds"]),
                        help="seconds of the whole stage table: ramp, hold, bursts, drain, ramp-down")
    parser.add_argument("--rooms", type=int, default=int(conf["rooms"]),
                        help="1 = one big room (maximum fan-out); more = listeners spread over small rooms")
    parser.add_argument("--posters", type=int, default=int(conf["posters"]), help="users posting in bursts")
    parser.add_argument("--burst-size", type=int, default=int(conf["burst-size"]),
                        help="messages per burst, sent back to back")
    parser.add_argument("--burst-gap", type=float, default=float(conf["burst-gap"]),
                        help="mean seconds of quiet after each burst, per poster")
    parser.add_argument("--poll-timeout", type=float, default=float(conf["poll-timeout"]),
                        help="seconds each poll asks the server to hold it")
    parser.add_argument("--spawn-rate", type=float, default=float(conf["spawn-rate"]),
                        help="users started per second during the ramp")
    parser.add_argument("--workers", type=int, default=1,
                        help="server workers; more than 1 runs gunicorn on the shared Redis bus")
    parser.add_argument("--client-processes", type=int, default=2,
                        help="Locust worker processes (default %(default)s; 1 = a single local runner). "
                             "One process answers for every listener's re-poll after each message "
                             "of a burst, and with a fast fan-out it became the limit: above 90%% CPU "
                             "for seconds at 2000 listeners, and its lag in the latencies")
    parser.add_argument("--host", default="",
                        help="URL of a Chattle already running elsewhere; then no server is started "
                             "and only /stats is sampled")
    parser.add_argument("--report-root", default=REPORTS_ROOT,
                        help="directory that receives <timestamp>-load/ (tests point it at a temp dir)")
    return parser.parse_args(argv)


# -- preflight ------------------------------------------------------------------------------------

def preflight(args):
    """(stages, problems, notes): problems make the run refuse to start."""
    problems, notes = [], []
    users = args.users + args.posters
    stages = None
    try:
        stages = build_stages(args.users, args.posters, args.duration, args.spawn_rate)
    except ValueError as exc:
        problems.append(str(exc))
    if args.users < 1 or args.posters < 1 or args.rooms < 1:
        problems.append("--users, --posters and --rooms must each be at least 1")

    soft, hard = raise_descriptor_limit()
    per_client = -(-users // max(1, args.client_processes)) + DESCRIPTORS_SPARE
    if soft < per_client:
        problems.append("the load generator needs %d open files per Locust process but the limit is %d "
                        "(hard %d); raise it with `ulimit -Hn` / limits.conf, or use fewer --users or more "
                        "--client-processes" % (per_client, soft, hard))
    notes.append("client open-file limit %d (raised from the soft limit to the hard one)" % soft)

    if not args.host:
        if args.workers > 1:
            if missing(["redis-server"]):
                problems.append(missing_line(["redis-server"]))
            conf = runpy.run_path(os.path.join(ROOT, "gunicorn.conf.py"))
            capacity = conf["worker_connections"] * args.workers
            if capacity < users:
                problems.append("gunicorn admits worker_connections %d x %d workers = %d connections, fewer "
                                "than the %d users; the rest would wait silently in the listen backlog"
                                % (conf["worker_connections"], args.workers, capacity, users))
            notes.append("gunicorn worker_connections %d x %d workers" % (conf["worker_connections"], args.workers))
        else:
            # chattle.py takes the hard limit for itself; one process holds every poll.
            if hard < users + DESCRIPTORS_SPARE:
                problems.append("the server needs %d open files for %d users, the hard limit is %d"
                                % (users + DESCRIPTORS_SPARE, users, hard))
            notes.append("server open-file limit %d (chattle.py raises its soft limit to the hard one)" % hard)

    client_timeout = args.poll_timeout + CLIENT_TIMEOUT_MARGIN
    if not 0 < args.poll_timeout <= POLL_TIMEOUT_MAX:
        problems.append("--poll-timeout must be in (0, %d] seconds (the protocol's range)" % POLL_TIMEOUT_MAX)
    if not args.poll_timeout < client_timeout:
        problems.append("the client timeout must be longer than the poll timeout")
    notes.append("timeouts nest: poll %gs < client network timeout %gs" % (args.poll_timeout, client_timeout))

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            low, high = (int(part) for part in ports.read().split())
        if high - low + 1 < users + DESCRIPTORS_SPARE:
            problems.append("only %d ephemeral ports (%d-%d) for %d client connections to one address"
                            % (high - low + 1, low, high, users))
    except (OSError, ValueError):
        pass
    return stages, problems, notes


# -- sampling the server and the load generator once a second --------------------------------------

class Sampler(threading.Thread):
    """Samples server RSS and CPU (summed over its serving pids), held polls (/stats waiters,
    summed over every worker seen in the last seconds) and the Locust processes' CPU."""

    def __init__(self, url, server=None, interval=1.0):
        super().__init__(daemon=True)
        self.url, self.server, self.interval = url, server, interval
        self.samples = []
        self.started = time.time()
        self.locust_pid = None
        self._halt = threading.Event()
        self._processes = {}
        self._waiters = {}  # pid -> (waiters, seen at)

    def stop(self):
        self._halt.set()
        self.join(10)

    def _cpu(self, pids):
        import psutil
        per_pid = []
        for pid in pids:
            process = self._processes.get(pid)
            try:
                if process is None:
                    process = self._processes[pid] = psutil.Process(pid)
                    process.cpu_percent(None)  # the first call only sets the baseline
                    continue
                per_pid.append(process.cpu_percent(None))
            except psutil.NoSuchProcess:
                self._processes.pop(pid, None)
        return per_pid

    def _locust_pids(self):
        import psutil
        if self.locust_pid is None:
            return []
        try:
            parent = psutil.Process(self.locust_pid)
            return [self.locust_pid] + [child.pid for child in parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _held_polls(self):
        probes = 1 if self.server is None or not self.server.gunicorn else 3 * self.server.workers
        now = time.time()
        for _ in range(probes):
            try:
                status, body = get_json(self.url + "/stats", timeout=2)
            except OSError:
                continue
            if status == 200 and isinstance(body, dict):
                self._waiters[body["pid"]] = (body["waiters"], now, body.get("rss_bytes"))
        fresh = [value for value in self._waiters.values() if now - value[1] < 3 * self.interval + 1]
        if not fresh:
            return None, None
        rss = [value[2] for value in fresh if value[2] is not None]
        return sum(value[0] for value in fresh), (sum(rss) if rss else None)

    def sample(self):
        from bench.measures import summed_rss
        now = time.time()
        waiters, stats_rss = self._held_polls()
        row = {"t": now - self.started, "time": now, "held_polls": waiters}
        if self.server is not None:
            pids = self.server.worker_pids()
            row["server_rss"] = summed_rss(pids)
            row["server_cpu"] = sum(self._cpu(pids))
        else:
            row["server_rss"] = stats_rss
            row["server_cpu"] = None
        client = self._cpu(self._locust_pids())
        import psutil
        # In % of one core like the others, so "everything else" is machine - server - client.
        row["machine_cpu"] = psutil.cpu_percent(None) * (psutil.cpu_count() or 1)
        row["client_cpu"] = sum(client) if client else None
        row["client_cpu_max_process"] = max(client) if client else None
        self.samples.append(row)
        return row

    def run(self):
        while not self._halt.is_set():
            began = time.monotonic()
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001  (a failed sample must not end the run)
                self.samples.append({"t": time.time() - self.started, "time": time.time(), "error": str(exc)})
            self._halt.wait(max(0.0, self.interval - (time.monotonic() - began)))


def progress_line(sampler, stages, locust_started, users):
    row = sampler.samples[-1] if sampler.samples else {}
    elapsed = time.time() - locust_started if locust_started else 0
    stage = stage_at(stages, elapsed) or {"name": "finishing"}
    mib = (row.get("server_rss") or 0) / 2 ** 20

    def pct(value):
        return "-" if value is None else "%3.0f%%" % value
    return ("load %4.0fs/%.0fs %-9s held polls %5s/%d  server RSS %6.1f MiB CPU %s  client CPU %s"
            % (elapsed, stages[-1]["end"], stage["name"], row.get("held_polls", "-"), users, mib,
               pct(row.get("server_cpu")), pct(row.get("client_cpu"))))


def final_cursors(url, rooms):
    """The last id of each room, asked after the posters stopped (GET without since)."""
    cursors = {}
    for index in range(rooms):
        status, body = get_json("%s/rooms/%s/msgs?limit=1" % (url, room_name(index)), timeout=10)
        if status != 200:
            raise RuntimeError("final cursor of room %s: answered %s %s" % (room_name(index), status, body))
        cursors[room_name(index)] = body["cursor"]
    return cursors


# -- the run ----------------------------------------------------------------------------------------

def stop_on_sigterm(_signum, _frame):
    raise KeyboardInterrupt  # the same clean-up path as Ctrl-C

def main(argv=None):
    args = parse_args(argv)
    stages, problems, notes = preflight(args)
    if problems:
        print("load: preflight refused the run:", file=sys.stderr)
        for problem in problems:
            print("  - " + problem, file=sys.stderr)
        return 2
    os.makedirs(args.report_root, exist_ok=True)
    report_dir = new_report_dir("load", root=args.report_root)
    raw_dir = os.path.join(report_dir, "raw")
    os.makedirs(raw_dir)
    print("load: report in %s" % report_dir)
    for note in notes:
        print("load: preflight ok: " + note)

    redis = server = locust = sampler = None
    interrupted = False
    started_at = time.time()
    locust_started = None
    cursors, run_error = {}, None
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        if args.host:
            url = args.host.rstrip("/")
            status, _body = get_json(url + "/health", timeout=5)
            if status != 200:
                raise RuntimeError("%s/health answered %s" % (url, status))
        else:
            redis_url = None
            if args.workers > 1:
                redis = RedisServer()
                redis_url = redis.url
                print("load: redis-server pid %d on %s" % (redis.pid, redis_url))
            server = ChattleServer(workers=args.workers, redis_url=redis_url,
                                   log_path=os.path.join(report_dir, "server.log"))
            url = server.url
            print("load: chattle %s on %s (pid %d)"
                  % ("gunicorn x%d" % args.workers if server.gunicorn else "python chattle.py", url, server.pid))
        sampler = Sampler(url, server)
        sampler.start()
        time.sleep(2)  # idle samples before anyone connects: the baseline RSS

        argv = [sys.executable, "-m", "locust", "--config", LOCUST_CONF,
                "-f", os.path.join(HERE, "locustfile.py"), "--headless", "--host", url,
                "--listeners", str(args.users), "--posters", str(args.posters), "--rooms", str(args.rooms),
                "--run-seconds", str(args.duration), "--spawn-rate", str(args.spawn_rate),
                "--poll-timeout", str(args.poll_timeout), "--burst-size", str(args.burst_size),
                "--burst-gap", str(args.burst_gap), "--raw-dir", raw_dir,
                "--csv", os.path.join(report_dir, "locust"), "--html", os.path.join(report_dir, "locust.html")]
        if args.client_processes > 1:
            argv += ["--processes", str(args.client_processes)]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        locust = Process(argv, env=env, log_path=os.path.join(report_dir, "locust.log"))
        locust_started = time.time()
        sampler.locust_pid = locust.pid
        interactive = sys.stdout.isatty()
        last_print = 0.0
        deadline = locust_started + args.duration + 60
        while locust.alive():
            if time.time() > deadline:
                raise RuntimeError("Locust did not finish within %gs of its stage table" % 60)
            if time.time() - last_print >= (1 if interactive else 10):
                line = progress_line(sampler, stages, locust_started, args.users)
                print(("\r" + line) if interactive else line, end="" if interactive else "\n", flush=True)
                last_print = time.time()
            time.sleep(0.25)
        if interactive:
            print()
        sampler.stop()
        cursors = final_cursors(url, args.rooms)
    except KeyboardInterrupt:
        interrupted = True
        print("\nload: interrupted; stopping what it started", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001  (reported below, and the run fails)
        run_error = str(exc)
        print("\nload: the run failed: %s" % exc, file=sys.stderr)
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        # Each stop on its own: one that fails must not leave the others running.
        for started, grace in ((locust, 15), (server, 10), (redis, 10)):
            if started is not None:
                try:
                    started.stop(grace=grace)
                except Exception as exc:  # noqa: BLE001
                    print("load: could not stop pid %d: %s" % (started.pid, exc), file=sys.stderr)

    if interrupted:
        return 130
    from loadtests.report import build_report, print_summary
    run_info = {"users": args.users, "posters": args.posters, "rooms": args.rooms, "duration": args.duration,
                "burst_size": args.burst_size, "burst_gap": args.burst_gap, "poll_timeout": args.poll_timeout,
                "client_timeout": args.poll_timeout + CLIENT_TIMEOUT_MARGIN, "spawn_rate": args.spawn_rate,
                "workers": args.workers, "client_processes": args.client_processes,
                "host": args.host or None, "server": ("gunicorn x%d, redis bus" % args.workers if args.workers > 1
                                                      else "python chattle.py, memory bus") if not args.host
                else "external %s" % args.host,
                "started": started_at, "locust_started": locust_started, "stages": stages,
                "preflight": notes, "run_error": run_error,
                "locust_exit_code": locust.popen.returncode if locust is not None else None}
    summary = build_report(report_dir, run_info, sampler.samples if sampler else [], cursors)
    print_summary(summary, report_dir)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
