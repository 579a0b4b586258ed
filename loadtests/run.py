"""`make load`: start Chattle, hold thousands of long-polls with Locust, burst posts, and
write a capacity report to reports/<timestamp>-load/.

Preflight first (descriptor limits, gunicorn's worker_connections, timeout ordering, the
stage table), so a run that cannot reach its target says why before it starts. Every
process it starts is stopped by pid at the end, also on Ctrl-C or failure. Exit status:
0 when every check passed, 1 when a check failed, 2 when preflight refused the run.
"""

import argparse
import os
import resource
import signal
import ssl
import sys
import threading
import time

from chattle_limits import (
    POLL_TIMEOUT_MAX,
    PROXY_TIMEOUT,
    client_timeout,
    connections_per_worker,
    raise_descriptor_limit,
)
from harness.processes import LOOPBACK, ROOT, ChattleServer, CleanUp, Process, RedisServer, free_port, get_json
from harness.proxy import TRUSTED_PROXY_ENV, in_front
from harness.system_packages import missing, missing_line, needed
from harness.tls import refusal_line
from instruments.measures import process_cpu_seconds
from instruments.page import new_report_dir
from instruments.provenance import provenance
from loadtests.cluster_load import LOCAL
from loadtests.faults import ALL, FAULTS, fault_problem, parse_chaos
from loadtests.options import COMPARE, RUN, add_to_parser, resolve_chaos_defaults, scenario_argv
from loadtests.scenario import (
    LOCUST_CONF,
    SETTLE_SECONDS,
    SHAPE_STARTED_FILE,
    build_stages,
    build_step_stages,
    room_name,
    server_urls,
    stage_at,
)

HERE = os.path.dirname(os.path.abspath(__file__))
DESCRIPTORS_SPARE = 200       # logs, pipes, the master link, /stats probes
DEFAULT_MASTER_PORT = 5557    # Locust's own default: the port to open to the load hosts
# Listeners one Locust process reads over TLS without its lag deciding the run: its
# answers take the Python path (loadtests/longpoll.py), and one process reading a
# 2000-listener fan-out through nginx with TLS lagged 29 ms at p99 against a wake-up p99
# of 212 ms, client-bound (docs/measuring.md, "Over TLS").
TLS_LISTENERS_PER_PROCESS = 1000


def parse_args(argv=None):
    """The flags of loadtests/options.py's table, the comparison's among them (for --help:
    main() hands an argv with --base to loadtests/compare.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_to_parser(parser, RUN, faults=", ".join(ALL))
    add_to_parser(parser.add_argument_group("make load BASE=<rev> (loadtests/compare.py)"), COMPARE)
    return resolve_chaos_defaults(parser.parse_args(argv))


# -- preflight ------------------------------------------------------------------------------------

def protocol_problem(url, ca_file=""):
    """None when `url` answers /health and a poll as the protocol says; else why not, in one line."""
    what = "%s does not speak the Chattle protocol" % url
    try:
        status, body = get_json(url + "/health", timeout=5, ca_file=ca_file)
        if status not in (200, 503) or not isinstance(body, dict) or "status" not in body:
            return "%s: GET /health answered %s %.80r, not {\"status\": ...}" % (what, status, body)
        status, body = get_json(url + "/rooms/%s/msgs?limit=1" % room_name(0), timeout=5, ca_file=ca_file)
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("cursor"), int) \
                or not isinstance(body.get("messages"), list):
            return "%s: GET /rooms/%s/msgs answered %s %.80r, not {\"messages\": [...], \"cursor\": N}" % (
                what, room_name(0), status, body)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None)
        if isinstance(reason, ssl.SSLError):
            return refusal_line(reason, url)
        return "%s: %s" % (what, exc)
    return None


def preflight(args):
    """(stages, problems, notes): problems make the run refuse to start."""
    problems, notes = [], []
    users = args.users + args.posters
    stages = None
    try:
        if args.shape == "steps":
            stages = build_step_stages(args.step, args.users, args.posters, args.spawn_rate, args.stop_rate)
            args.duration = stages[-1]["end"]  # the table's length; the shape may end it sooner
        else:
            stages = build_stages(args.users, args.posters, args.duration, args.spawn_rate, args.stop_rate)
    except ValueError as exc:
        problems.append(str(exc))
    if args.users < 1 or args.posters < 1 or args.rooms < 1:
        problems.append("--users, --posters and --rooms must each be at least 1")

    soft, hard = raise_descriptor_limit()
    if args.client_processes < 1:  # auto: as few as the descriptor limit allows, and TLS's cost
        args.client_processes = max(1, -(-users // max(1, soft - DESCRIPTORS_SPARE)))
        if args.tls or (args.host or "").startswith("https:"):
            args.client_processes = max(args.client_processes, -(-args.users // TLS_LISTENERS_PER_PROCESS))
    per_client = -(-users // args.client_processes) + DESCRIPTORS_SPARE
    if soft < per_client:
        problems.append("the load generator needs %d open files per Locust process but the limit is %d "
                        "(hard %d); raise it with `ulimit -Hn` / limits.conf, or use fewer --users or more "
                        "--client-processes" % (per_client, soft, hard))
    notes.append("client open-file limit %d (raised from the soft limit to the hard one), %d Locust worker "
                 "process(es)" % (soft, args.client_processes))
    for url in list(server_urls(args.host)):
        problem = protocol_problem(url, args.ca_file)
        if problem:
            problems.append(problem)
        else:
            notes.append("%s speaks the Chattle protocol (/health, a poll without since)" % url)
    if args.remote_workers < 0:
        problems.append("--remote-workers must be 0 or more")
    elif args.remote_workers and args.master_bind == LOOPBACK:
        notes.append("the master listens on loopback only: remote workers reach it only through a tunnel "
                     "(give --master-bind / MASTER_BIND an address they can reach)")

    problems += cluster_problems(args)
    if args.proxy and args.host:
        problems.append("--proxy starts nginx in front of the server this run starts: with --host, give the "
                        "proxy's own URL as --host")
    if args.tls and not args.proxy:
        problems.append("--tls is ended at the proxy this run starts: give --proxy nginx too (PROXY=nginx TLS=1); "
                        "for a server elsewhere, give its https:// URL as --host")
    if args.ca_file and not os.path.isfile(args.ca_file):
        problems.append("--ca-file %s: no such file" % args.ca_file)
    absent = missing(needed(["load"], workers=args.workers, redis_cluster=args.redis_cluster, host=args.host,
                            proxy=args.proxy))
    if absent:
        problems.append(missing_line(absent))
    if not args.host:
        if args.workers > 1 and not args.redis_cluster:
            per_worker = connections_per_worker(soft)  # as gunicorn.conf.py sets it, under the same limit
            capacity = per_worker * args.workers
            if capacity < users:
                problems.append("gunicorn admits worker_connections %d x %d workers = %d connections, fewer "
                                "than the %d users; the rest would wait silently in the listen backlog"
                                % (per_worker, args.workers, capacity, users))
            notes.append("gunicorn worker_connections %d x %d workers" % (per_worker, args.workers))
        else:
            # chattle.py takes the hard limit for itself; one process holds every poll.
            if hard < users + DESCRIPTORS_SPARE:
                problems.append("the server needs %d open files for %d users, the hard limit is %d: raise it "
                                "(`ulimit -Hn`, limits.conf or systemd's LimitNOFILE) or spread the users over "
                                "gunicorn workers (WORKERS=2)" % (users + DESCRIPTORS_SPARE, users, hard))
            notes.append("server open-file limit %d (chattle.py raises its soft limit to the hard one)" % hard)

    network_timeout = client_timeout(args.poll_timeout)
    if not 0 < args.poll_timeout <= POLL_TIMEOUT_MAX:
        problems.append("--poll-timeout must be in (0, %d] seconds (the protocol's range)" % POLL_TIMEOUT_MAX)
    if not args.poll_timeout < network_timeout:
        problems.append("the client timeout must be longer than the poll timeout")
    if args.proxy:
        if not args.poll_timeout < PROXY_TIMEOUT:
            problems.append("nginx's proxy_read_timeout %ds must be longer than the poll timeout %gs"
                            % (PROXY_TIMEOUT, args.poll_timeout))
        notes.append("timeouts nest: poll %gs < nginx proxy_read_timeout and send_timeout %ds; poll %gs < client "
                     "network timeout %gs" % (args.poll_timeout, PROXY_TIMEOUT, args.poll_timeout, network_timeout))
    else:
        notes.append("timeouts nest: poll %gs < client network timeout %gs" % (args.poll_timeout, network_timeout))

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            low, high = (int(part) for part in ports.read().split())
        if high - low + 1 < users + DESCRIPTORS_SPARE:
            problems.append("only %d ephemeral ports (%d-%d) for %d client connections to one address"
                            % (high - low + 1, low, high, users))
    except (OSError, ValueError):
        pass
    return stages, problems, notes


def cluster_problems(args):
    """Why --redis-cluster, --redis-wait and --chaos cannot run as given; [] when they can."""
    problems = []
    try:
        faults = parse_chaos(args.chaos)
    except ValueError as exc:
        problems.append("--chaos: %s" % exc)
        faults = []
    if len(faults) == 1 and FAULTS[faults[0]].needs == "cluster" and args.redis_cluster != LOCAL:
        problems.append("--chaos %s kills a master of the cluster by its pid: it needs --redis-cluster local "
                        "(REDIS_CLUSTER=local), a cluster this run starts" % args.chaos)
    elif len(faults) == 1:
        problem = fault_problem(FAULTS[faults[0]], args)
        if problem:
            problems.append("--chaos " + problem)
    if args.chaos and args.shape != "bursts":
        problems.append("--chaos %s strikes during the bursts stage: it needs --shape bursts" % args.chaos)
    if args.redis_wait is not None and not args.redis_cluster:
        problems.append("--redis-wait (REDIS_WAIT=) is a setting of the cluster bus: give --redis-cluster too")
    if args.redis_wait is not None and args.redis_wait < 0:
        problems.append("--redis-wait must be 0 or more milliseconds")
    if not args.redis_cluster:
        return problems
    if args.host:
        problems.append("--host runs no server here: start those servers on the cluster yourself "
                        "(--redis-cluster goes with a server this run starts)")
    if args.redis_cluster == LOCAL:
        return problems
    from harness import failover
    try:
        state = failover.ask(args.redis_cluster.split(",")[0].strip(), "CLUSTER", "INFO")
        if "cluster_state:ok" not in state:
            problems.append("the Redis Cluster at %s says it is not ok (CLUSTER INFO); start it with "
                            "`make redis-cluster` or use REDIS_CLUSTER=local" % args.redis_cluster)
    except Exception as exc:  # noqa: BLE001  (any failure to ask is the same refusal)
        problems.append("no Redis Cluster node answers at %s (%s): give host:port of a node, or "
                        "REDIS_CLUSTER=local to start one for the run" % (args.redis_cluster, exc))
    return problems


# -- sampling the server and the load generator once a second --------------------------------------

class Sampler(threading.Thread):
    """Once a second: server RSS and CPU (summed over its serving pids), held polls (/stats
    waiters, summed over every worker seen in the last seconds), the Locust processes'
    CPU, and the whole machine's. CPU is read from /proc and kept per pid as a running
    total, so the run's CPU seconds come from the same readings as the chart."""

    def __init__(self, urls, server=None, interval=1.0, proxy=None, ca_file=""):
        super().__init__(daemon=True)
        self.urls, self.server, self.interval = urls, server, interval
        self.proxy, self.ca_file = proxy, ca_file
        self.samples = []
        self.started = time.time()
        self.locust_pid = None
        self._halt = threading.Event()
        self._waiters = {}  # (url, pid) -> (waiters, seen at, rss), written by the prober
        self._waiters_lock = threading.Lock()
        self._prober = threading.Thread(target=self._probe_now_and_then, daemon=True)
        self.cpu_seen = {}  # pid -> (first CPU seconds seen, last CPU seconds seen)
        self.client_pids = set()
        self.client_processes = {}
        self._last_cpu = {}
        self._last_time = None
        self._machine = None

    def stop(self):
        self._halt.set()
        self.join(10)
        if self._prober.is_alive():
            self._prober.join(10)

    def cpu_seconds(self, pids, since_first_seen=False):
        """CPU seconds of `pids` at their last reading (less their first, if asked)."""
        return sum(last - (first if since_first_seen else 0.0)
                   for pid, (first, last) in self.cpu_seen.items() if pid in pids)

    def _cpu_percent(self, pids, elapsed):
        """Per pid, % of one core since the previous sample (a pid's first reading sets its base).
        Readings are kept even without `elapsed`, so the first sample sets every base."""
        per_pid = []
        for pid in pids:
            try:
                now = process_cpu_seconds(pid)
            except (OSError, ValueError, IndexError):
                continue
            first = self.cpu_seen.get(pid, (now, now))[0]
            self.cpu_seen[pid] = (first, now)
            before = self._last_cpu.get(pid)
            self._last_cpu[pid] = now
            if before is not None and elapsed:
                per_pid.append(100.0 * (now - before) / elapsed)
        return per_pid

    def locust_pids(self):
        import psutil
        if self.locust_pid is None:
            return []
        try:
            parent = psutil.Process(self.locust_pid)
            return [self.locust_pid] + [child.pid for child in parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _probe_now_and_then(self):
        """/stats probes, in a thread of their own: with several gunicorn workers each probe
        can wait on a worker busy with a fan-out, and in the sampling thread they made its
        rows late (133 rows for about 157 s at 20 000 listeners), stretching the seconds
        the CPU readings stand for."""
        while not self._halt.is_set():
            began = time.monotonic()
            self._probe()
            self._halt.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def _probe(self):
        """Each probe reaches whichever worker accepts it, so a few per worker."""
        workers = self.server.workers if self.server is not None else 2
        probes = 1 if self.server is not None and not self.server.gunicorn else 3 * workers
        for url in self.urls:
            for _ in range(probes):
                if self._halt.is_set():
                    return
                try:
                    # behind the proxy, straight to the server: nginx's kept upstream connections
                    # would take every probe to the same gunicorn worker
                    status, body = get_json((self.server.url if self.proxy is not None else url) + "/stats",
                                            timeout=2, ca_file=self.ca_file)
                except OSError:
                    continue
                if status == 200 and isinstance(body, dict):
                    with self._waiters_lock:
                        self._waiters[(url, body["pid"])] = (body["waiters"], time.time(), body.get("rss_bytes"))

    def _held_polls(self):
        """{url: (held polls, RSS from /stats)} summed over the workers the prober saw
        behind each URL lately."""
        now = time.time()
        per_server = {}
        with self._waiters_lock:
            seen = list(self._waiters.items())
        for url in self.urls:
            fresh = [value for key, value in seen if key[0] == url and now - value[1] < 3 * self.interval + 1]
            rss = [value[2] for value in fresh if value[2] is not None]
            per_server[url] = (sum(value[0] for value in fresh) if fresh else None, sum(rss) if rss else None)
        return per_server

    def _machine_cpu(self):
        """Every core's busy time since the last sample, in % of one core (/proc/stat)."""
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        idle, total = fields[3] + fields[4], sum(fields[:8])
        before, self._machine = self._machine, (idle, total)
        if before is None or total == before[1]:
            return None
        cores = os.cpu_count() or 1
        return 100.0 * cores * (1.0 - (idle - before[0]) / (total - before[1]))

    def sample(self):
        import psutil

        from instruments.measures import summed_descriptors, summed_rss
        # Every CPU reading first, at one moment; held polls and remote RSS come from what
        # the prober last saw.
        now = time.time()
        elapsed = now - self._last_time if self._last_time else None
        self._last_time = now
        server_pids = self.server.worker_pids() if self.server is not None else []
        server = self._cpu_percent(server_pids, elapsed)
        proxy_pids = self.proxy.pids() if self.proxy is not None else []
        proxy = self._cpu_percent(proxy_pids, elapsed)
        client_pids = self.locust_pids()
        client = self._cpu_percent(client_pids, elapsed)
        machine = self._machine_cpu()
        self.client_pids.update(client_pids)
        for pid in client_pids:
            if pid not in self.client_processes:
                try:
                    # psutil.Process remembers the start time: it never signals a reused pid
                    self.client_processes[pid] = psutil.Process(pid)
                except psutil.NoSuchProcess:
                    pass
        per_server = self._held_polls()
        held = [value[0] for value in per_server.values() if value[0] is not None]
        stats_rss = [value[1] for value in per_server.values() if value[1] is not None]
        row = {"t": now - self.started, "time": now, "seconds": elapsed, "held_polls": sum(held) if held else None,
               "machine_cpu": machine,
               "servers": {url: {"held_polls": value[0], "rss": value[1]} for url, value in per_server.items()},
               "server_rss": summed_rss(server_pids) if self.server is not None else
               (sum(stats_rss) if stats_rss else None),
               "server_cpu": sum(server) if self.server is not None and elapsed else None,
               "client_cpu": sum(client) if client else None,
               "client_cpu_max_process": max(client) if client else None,
               "server_descriptors": summed_descriptors(server_pids) if self.server is not None else None}
        if self.proxy is not None:
            row.update(proxy_cpu=sum(proxy) if elapsed else None, proxy_rss=summed_rss(proxy_pids),
                       proxy_descriptors=summed_descriptors(proxy_pids))
        self.samples.append(row)
        return row

    def run(self):
        self._prober.start()
        while not self._halt.is_set():
            began = time.monotonic()
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001  (a failed sample must not end the run)
                self.samples.append({"t": time.time() - self.started, "time": time.time(), "error": str(exc)})
            self._halt.wait(max(0.0, self.interval - (time.monotonic() - began)))


def shape_started(raw_dir):
    """The wall-clock time of the stages' 0 s, once Locust's shape has started (it writes
    it to raw/): the clock of the progress line and the report. None before."""
    try:
        with open(os.path.join(raw_dir, SHAPE_STARTED_FILE)) as started:
            return float(started.read())
    except (OSError, ValueError):
        return None


def progress_line(sampler, stages, stages_started, users):
    row = sampler.samples[-1] if sampler.samples else {}
    elapsed = time.time() - stages_started if stages_started else 0
    stage = (stage_at(stages, elapsed) or {"name": "finishing"}) if stages_started else {"name": "starting"}
    mib = (row.get("server_rss") or 0) / 2 ** 20

    def pct(value):
        return "-" if value is None else "%3.0f%%" % value
    return ("load %4.0fs/%.0fs %-9s held polls %5s/%d  server RSS %6.1f MiB CPU %s  client CPU %s"
            % (elapsed, stages[-1]["end"], stage["name"], row.get("held_polls", "-"), users, mib,
               pct(row.get("server_cpu")), pct(row.get("client_cpu"))))


def final_cursors(url, rooms, ca_file=""):
    """The last id of each room, asked after the posters stopped (GET without since)."""
    cursors = {}
    for index in range(rooms):
        status, body = get_json("%s/rooms/%s/msgs?limit=1" % (url, room_name(index)), timeout=10, ca_file=ca_file)
        if status != 200:
            raise RuntimeError("final cursor of room %s: answered %s %s" % (room_name(index), status, body))
        cursors[room_name(index)] = body["cursor"]
    return cursors


# -- the run ----------------------------------------------------------------------------------------

def children_cpu_seconds():
    """CPU seconds of every child this process has reaped (and the children they reaped)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def locust_argv(args, urls, report_dir, raw_dir, ui_port=None):
    if args.remote_workers:
        # Only the master here; it waits for the remote workers (bounded), then plays the table.
        master_port = args.master_port or DEFAULT_MASTER_PORT
        workers = ["--master", "--expect-workers", str(args.remote_workers),
                   "--expect-workers-max-wait", str(int(args.worker_wait))]
    else:
        # A port of its own: two runs on one machine (a test beside a run) must not hand
        # each other's workers to the wrong master, as 5557 for all would.
        # (forked workers dial --master-host/--master-port, the master listens on the bind pair)
        master_port = args.master_port or free_port()
        workers = ["--processes", str(args.client_processes),
                   "--master-host", LOOPBACK if args.master_bind in ("0.0.0.0", "::") else args.master_bind,
                   "--master-port", str(master_port)]
    return [sys.executable, "-m", "locust", "--config", LOCUST_CONF, "-f", os.path.join(HERE, "locustfile.py"),
            *page_or_headless(ui_port), "--host", urls[0], "--servers", ",".join(urls), *workers,
            "--master-bind-host", args.master_bind, "--master-bind-port", str(master_port),
            *scenario_argv(args), "--raw-dir", raw_dir, *(["--receipts"] if args.chaos else []),
            "--csv", os.path.join(report_dir, "locust"), "--html", os.path.join(report_dir, "locust.html")]


def page_or_headless(ui_port):
    """Locust's flags for a run watched on its web page on `ui_port` (bound to loopback, started at
    once), or, without one, run headless."""
    if ui_port is None:
        return ["--headless"]
    return ["--autostart", "--web-host", LOOPBACK, "--web-port", str(ui_port)]


def watch_locust(locust, sampler, stages, args, raw_dir):
    """Print progress until Locust ends (bounded: the stage table, settling and a margin),
    on the shape's clock: with remote workers, the master first waits for them."""
    interactive = sys.stdout.isatty()
    last_print = 0.0
    started = time.time()
    deadline = started + args.duration + SETTLE_SECONDS + 60 + (args.worker_wait if args.remote_workers else 0)
    while locust.alive():
        if time.time() > deadline:
            raise RuntimeError("Locust did not finish within %gs of its stage table" % (SETTLE_SECONDS + 60))
        if time.time() - last_print >= (1 if interactive else 10):
            line = progress_line(sampler, stages, shape_started(raw_dir), args.users)
            print(("\r" + line) if interactive else line, end="" if interactive else "\n", flush=True)
            last_print = time.time()
        time.sleep(0.25)
    if interactive:
        print()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(arg == "--base" or arg.startswith("--base=") for arg in argv):
        from loadtests import compare  # its own flags (--allow-dirty, --head-env) too
        return compare.main(argv, sys.modules[__name__])
    args = parse_args(argv)
    try:
        faults = parse_chaos(args.chaos)
    except ValueError:
        faults = []   # preflight says why
    if len(faults) > 1:
        return chaos_matrix(args, argv, faults)
    args.command = make_command(args)   # as given, before preflight settles the automatic values
    if args.proxy and not args.host:
        return with_and_without_proxy(args)
    return run_once(args)[0]


def with_and_without_proxy(args):
    """The same load first straight to the server, then through the proxy: the proxied
    run's report has the proxy's cost beside the direct run's figures. Passes when both do."""
    _stages, problems, _notes = preflight(args)
    if problems:
        return refuse(problems)
    print("load: first the same load without %s, for its cost beside it" % args.proxy)
    direct_code, direct = run_once(argparse.Namespace(**dict(vars(args), proxy="", tls=False)))
    if direct_code in (2, 130) or direct is None:
        return direct_code
    args.without_proxy = {"figures": direct["cost_figures"], "report_dir": direct["report_dir"],
                          "passed": direct["passed"]}
    print("load: now through %s%s" % (args.proxy, " with TLS" if args.tls else ""))
    code, _summary = run_once(args)
    return code if code else direct_code


def refuse(problems):
    print("load: preflight refused the run:", file=sys.stderr)
    for problem in problems:
        print("  - " + problem, file=sys.stderr)
    return 2


def run_once(args):
    """One run as `args` say: (exit status, its summary, None when it never started)."""
    orchestrator_cpu_before = process_cpu_seconds(os.getpid())  # a run before this one in the process is not its
    try:
        faults = parse_chaos(args.chaos)
    except ValueError:
        faults = []   # preflight says why
    fault = FAULTS[faults[0]] if faults else None
    stages, problems, notes = preflight(args)
    if problems:
        return refuse(problems), None
    os.makedirs(args.report_root, exist_ok=True)
    report_dir = new_report_dir("load", root=args.report_root)
    raw_dir = os.path.join(report_dir, "raw")
    os.makedirs(raw_dir)
    print("load: report in %s" % report_dir)
    for note in notes:
        print("load: preflight ok: " + note)

    redis = server = proxy = locust = sampler = cluster = chaos = chaos_context = None
    cluster_info, histories = None, {}
    proxy_cpu_before = None
    interrupted = False
    started_at = time.time()
    run_provenance = provenance()  # the tree as it starts: a long run outlives a commit
    locust_started = server_cpu_before = locust_reaped_cpu = None
    urls, cursors, run_error = [], {}, None
    from instruments.history import git_state
    revision = git_state()   # as the run began: the tree the figures belong to
    # Python leaves SIGINT ignored when it starts ignored (a script's background job):
    # Ctrl-C, or a SIGINT sent on purpose, must still end the run through its clean-up.
    CleanUp.arm()
    try:
        if args.host:
            urls = list(server_urls(args.host))
        else:
            redis_url, server_env = None, {}
            if args.redis_cluster:
                from loadtests.cluster_load import ClusterForLoad
                cluster = ClusterForLoad(args.redis_cluster, os.path.join(report_dir, "redis-cluster"))
                server_env = {"CHATTLE_REDIS_CLUSTER": cluster.addresses}
                if args.redis_wait is not None:  # else the server's default
                    server_env["CHATTLE_REDIS_WAIT"] = str(args.redis_wait)
                print("load: redis cluster %s%s" % (cluster.addresses, " (pids %s)" % ", ".join(
                    str(pid) for pid in cluster.pids().values()) if cluster.local else ""))
            elif args.workers > 1:
                redis = RedisServer(own_session=True, appendonly=fault.redis_appendonly if fault else True)
                redis_url = redis.url
                print("load: redis-server pid %d on %s" % (redis.pid, redis_url))
            if fault is not None:
                server_env.update(fault.server_env)
            if args.proxy:
                server_env.update(TRUSTED_PROXY_ENV)
            server = ChattleServer(workers=args.workers, redis_url=redis_url, env=server_env, own_session=True,
                                   log_path=os.path.join(report_dir, "server.log"), root=args.server_root,
                                   python=args.server_python)
            urls = [server.url]
            print("load: chattle %s on %s (pid %d)"
                  % ("gunicorn x%d" % args.workers if server.gunicorn else "python chattle.py", server.url,
                     server.pid))
            if args.proxy:
                proxy = in_front(server, os.path.join(report_dir, "nginx"), tls=args.tls, own_session=True,
                                 connections=args.users + args.posters + DESCRIPTORS_SPARE)
                urls = [proxy.url]
                if args.tls and not args.ca_file:
                    args.ca_file = proxy.certificates.ca
                print("load: nginx on %s (pid %d) in front of it, configuration %s"
                      % (proxy.url, proxy.pid, proxy.config_path))
        sampler = Sampler(urls, server, proxy=proxy, ca_file=args.ca_file)
        sampler.start()
        time.sleep(2)  # idle samples before anyone connects: the baseline RSS
        if server is not None:
            server_cpu_before = sum(process_cpu_seconds(pid) for pid in server.worker_pids())
        if proxy is not None:
            proxy_cpu_before = sum(process_cpu_seconds(pid) for pid in proxy.pids())
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if args.remote_workers:
            print("load: the Locust master waits up to %gs for %d remote worker(s) on %s:%d"
                  % (args.worker_wait, args.remote_workers, args.master_bind, args.master_port or DEFAULT_MASTER_PORT))
        # Locust's master reaps the workers it forked, and this process reaps the master:
        # the CPU of them all, start-up included, reaches RUSAGE_CHILDREN, as an outside
        # observer (`time make load`) would count it.
        children_cpu_before = children_cpu_seconds()
        ui_port = free_port() if args.ui else None
        locust = Process(locust_argv(args, urls, report_dir, raw_dir, ui_port), env=env, own_session=True,
                         log_path=os.path.join(report_dir, "locust.log"))
        locust_started = time.time()
        sampler.locust_pid = locust.pid
        if args.ui:
            print("load: Locust's page on http://%s:%d/ (tab 'Chattle live'); its Stop ends the run as Ctrl-C does"
                  % (LOOPBACK, ui_port), flush=True)
        if fault is not None and fault.needs == "cluster":
            from loadtests.cluster_load import FailoverChaos
            chaos = FailoverChaos(cluster, urls[0], room_name(0), stages, lambda: shape_started(raw_dir))
            chaos.start()
        elif fault is not None:
            from loadtests.faults import ChaosThread, FaultContext
            chaos_context = FaultContext(redis, server, urls[0], raw_dir, [room_name(index) for index in
                                                                           range(args.rooms)],
                                         args.poll_timeout, locust.pid)
            chaos = ChaosThread(fault, chaos_context, stages, lambda: shape_started(raw_dir))
            chaos.start()
        watch_locust(locust, sampler, stages, args, raw_dir)
    except KeyboardInterrupt:
        interrupted = True
        print("\nload: interrupted; stopping what it started and writing the partial report", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001  (reported below, and the run fails)
        run_error = str(exc)
        print("\nload: the run failed: %s" % exc, file=sys.stderr)
    finally:
        CleanUp.begin()  # a second SIGTERM or Ctrl-C must not cut the clean-up short
        # Locust first, then the servers.
        if locust is not None:
            stop_locust(locust, sampler, args)
            if not locust.alive():
                locust_reaped_cpu = children_cpu_seconds() - children_cpu_before
        if chaos is not None:
            chaos.stop()
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        server_cpu = None
        if server is not None and server.alive() and server_cpu_before is not None:
            server_cpu = sum(process_cpu_seconds(pid) for pid in server.worker_pids()) - server_cpu_before
        proxy_cpu = None
        if proxy is not None and proxy.alive() and proxy_cpu_before is not None:
            proxy_cpu = sum(process_cpu_seconds(pid) for pid in proxy.pids()) - proxy_cpu_before
        if urls and (server is None or server.alive()):
            try:
                cursors = final_cursors(urls[0], args.rooms, args.ca_file)
            except (OSError, RuntimeError, ValueError) as exc:
                run_error = run_error or "final cursors: %s" % exc
        if cluster is not None:
            try:
                cluster_info, histories = cluster_figures(cluster, args, urls, cursors, chaos)
            except Exception as exc:  # noqa: BLE001  (the report says it, the cluster is still stopped)
                run_error = run_error or "the cluster's figures: %s" % exc
        if chaos_context is not None:
            redis = chaos_context.redis   # a restarted one is the one to stop
        for started, grace in ((proxy, 10), (server, 10), (redis, 10)):
            if started is not None:
                stop_quietly(started, grace)
        if cluster is not None:
            try:
                cluster.stop()
            except Exception as exc:  # noqa: BLE001
                print("load: could not stop the redis cluster: %s" % exc, file=sys.stderr)
        CleanUp.arm()

    from loadtests.report import build_report, print_summary
    run_info = {"users": args.users, "posters": args.posters, "rooms": args.rooms, "duration": args.duration,
                "burst_size": args.burst_size, "burst_gap": args.burst_gap, "schedule_seed": args.seed,
                "poll_timeout": args.poll_timeout,
                "client_timeout": client_timeout(args.poll_timeout), "spawn_rate": args.spawn_rate,
                "stop_rate": args.stop_rate, "workers": args.workers, "client_processes": args.client_processes,
                "host": args.host or None, "servers": urls, "remote_workers": args.remote_workers,
                "server": ("%s, redis-cluster bus%s" % ("gunicorn x%d" % args.workers if args.workers > 1
                                                         else "python chattle.py",
                                                         ", --redis-wait %d" % args.redis_wait
                                                         if args.redis_wait is not None
                                                         else "") if args.redis_cluster else
                           "gunicorn x%d, redis bus" % args.workers if args.workers > 1
                           else "python chattle.py, memory bus") if not args.host
                else "external %s" % args.host,
                "proxy": ("nginx %s (%s)" % ("with TLS" if args.tls else "plain http", proxy.config_path)
                          if proxy is not None else None),
                "proxy_cpu_seconds": proxy_cpu, "without_proxy": getattr(args, "without_proxy", None),
                "tls": bool(args.tls or (args.host or "").startswith("https:")),
                "cluster": cluster_info, "chaos": fault.name if fault else None,
                "chaos_record": chaos_record(chaos, fault),
                "provenance": run_provenance, "git": revision,
                "started": started_at, "locust_started": locust_started,
                "command": getattr(args, "command", "") or make_command(args), "shape_started": shape_started(raw_dir),
                "stages": stages,
                "preflight": notes, "run_error": run_error, "interrupted": interrupted,
                "server_cpu_seconds": server_cpu,
                "client_cpu_seconds_sampled": sampler.cpu_seconds(sampler.client_pids) if sampler else None,
                "client_cpu_seconds_reaped": locust_reaped_cpu,
                # this process: preflight, the sampler thread, the watch and the clean-up
                # (the report's charts come after and are not counted)
                "orchestrator_cpu_seconds": process_cpu_seconds(os.getpid()) - orchestrator_cpu_before,
                "locust_exit_code": locust.popen.returncode if locust is not None else None}
    if histories:
        from instruments.page import write_json
        write_json(os.path.join(raw_dir, "histories.json"), histories)
    summary = build_report(report_dir, run_info, sampler.samples if sampler else [], cursors)
    print_summary(summary, report_dir)
    if summary.get("proxy_cost"):
        from loadtests.proxy_cost import lines
        for line in lines(summary["proxy_cost"]["without"], summary["proxy_cost"]["with"]):
            print("  " + line)
    summary["report_dir"] = report_dir
    if args.shape == "steps":
        from loadtests.shapes import steps_summary
        for line in steps_summary(os.path.join(raw_dir, "steps.json")) or ["no step was judged"]:
            print("steps: " + line)
    from instruments.history import record_load
    record_load(summary, args.report_root, report_dir)
    if interrupted:
        return 130, summary
    return (0 if summary["passed"] else 1), summary


def make_command(args):
    """The `make load` that gives this run's settings: every option not at its default."""
    from loadtests.options import OPTIONS, SWITCH
    given = []
    for option in OPTIONS:
        if not option.variable or option.name in ("report-root", "ca-file"):
            continue
        value = getattr(args, option.dest, None)
        if option.kind == SWITCH:
            given += ["%s=1" % option.variable] if value else []
        elif value not in (None, "") and value != option.default:
            given.append("%s=%s" % (option.variable, shown_value(value)))
    return " ".join(["make load"] + given)


def shown_value(value):
    return "%g" % value if isinstance(value, float) else str(value)


def chaos_record(chaos, fault):
    """What the fault's thread recorded (loadtests/faults.py), for the report's row."""
    if chaos is None or fault is None:
        return None
    if fault.needs == "cluster":
        record = dict(chaos.record, fault=fault.name, what=fault.what, error=chaos.error,
                      injected_at=chaos.record.get("killed_at"), harness_done_at=chaos.record.get("promoted_at"))
        posts = [[chaos.room, message_id, ts, None] for _when, status, message_id, ts in chaos.probe_posts
                 if status == 201]
        refusals = [[when, chaos.room, status, False] for when, status, _id, _ts in chaos.probe_posts
                    if status != 201]
        return dict(record, probe_posts_accepted=posts, probe_refusals=refusals)
    return dict(chaos.record, error=chaos.error, probe_posts_accepted=chaos.probe_posts,
                probe_refusals=chaos.probe_refusals)


def chaos_matrix(args, argv, faults):
    """CHAOS=all or several faults: refuse at once what cannot run, else each fault its own run."""
    from instruments.page import new_report_dir
    problems = []
    for name in faults:
        fault = FAULTS[name]
        problem = fault_problem(fault, argparse.Namespace(**dict(
            vars(args), redis_cluster=LOCAL if fault.needs == "cluster" else "")))
        if problem:
            problems.append(problem)
    if problems:
        print("load: preflight refused the CHAOS matrix:", file=sys.stderr)
        for problem in problems:
            print("  - " + problem, file=sys.stderr)
        return 2
    os.makedirs(args.report_root, exist_ok=True)
    from loadtests.faults import run_matrix
    return run_matrix(faults, argv, args.report_root, new_report_dir)


def cluster_figures(cluster, args, urls, cursors, chaos):
    """(what the report needs of the cluster, {room: {id: ts}} of every room's history with
    --chaos), read after the load and before the server stops."""
    from loadtests.cluster_load import room_history
    rooms = [room_name(index) for index in range(args.rooms)]
    info = {"addresses": cluster.addresses, "local": cluster.local is not None, "pids": cluster.pids(),
            "table": cluster.table, "room_slots": cluster.room_slots(rooms), "node_cpu_s": cluster.cpu_used(),
            "redis_wait_ms": args.redis_wait}
    histories = {}
    if chaos is not None:
        info["failover"] = dict(chaos.record, probe_posts=chaos.probe_posts, error=chaos.error)
        for room in rooms:
            histories[room] = {str(key): ts for key, ts in room_history(urls[0], room, cursors.get(room, 0)).items()}
    return info, histories


def stop_locust(locust, sampler, args):
    """End the load as a run ends when it is still going (Ctrl-C, a failure): SIGUSR1 asks the
    shape to stop every listener, let each catch up and report, and end (bounded by the
    ramp-down and the settling time). Then its processes by pid: the master and, since a
    master that dies leaves them behind, every worker it forked."""
    import psutil
    workers = dict(sampler.client_processes) if sampler else {}
    if locust.alive():
        try:
            workers.update((child.pid, child) for child in psutil.Process(locust.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
        locust.signal(signal.SIGUSR1)
        deadline = time.monotonic() + (args.users + args.posters) / args.stop_rate + SETTLE_SECONDS + 15
        while locust.alive() and time.monotonic() < deadline and not CleanUp.hurry:
            time.sleep(0.25)
    stop_quietly(locust, 10)
    for worker in workers.values():
        try:
            worker.terminate()
            worker.wait(5)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            worker.kill()


def stop_quietly(process, grace):
    """Stop one process we started; a failure to stop one must not leave the others running."""
    try:
        process.stop(grace=grace)
    except Exception as exc:  # noqa: BLE001
        print("load: could not stop pid %d: %s" % (process.pid, exc), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
