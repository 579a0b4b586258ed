"""The harness's process library: start and stop what a run needs, a Chattle server, a
reference peer and a redis-server.

One place for it, used by `make run`, `make load`, `make bench` and the tests alike.
Every process is started here, remembered by its pid and ended by that pid only.
"""

import compileall
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from harness import system_packages
from instruments.provenance import bench_environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = "127.0.0.1"
BENCH_SERVER_DIR = os.path.join(ROOT, "harness")
BENCH_SERVER = os.path.join(BENCH_SERVER_DIR, "bench_server.py")  # chattle with CHATTLE_BENCH_* faults
SEED_FLAGS = ["--worker-class", "gevent", "--workers", "1", "chattle"]  # the seed's, after its --bind


def free_port(host=LOOPBACK):
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def get_json(url, timeout=5.0, ca_file=None):
    """(status, decoded body) of a GET; errors answered by the server are returned, not raised
    (a body that is not JSON as its bytes); no answer at all raises OSError. An https://
    server's certificate is checked against `ca_file` (else the system's CAs)."""
    return _exchange(url, timeout, ca_file)


def post_json(url, payload, timeout=5.0, ca_file=None):
    """(status, decoded body) of a POST of `payload` as JSON, answered as get_json's."""
    return _exchange(urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                            headers={"Content-Type": "application/json"}), timeout, ca_file)


def _exchange(request, timeout, ca_file=None):
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body or b"null")
        except ValueError:
            return error.code, body


def answers_health(url):
    """Whether the server at `url` answers GET /health with 200."""
    status, _body = get_json(url + "/health", timeout=1)
    return status == 200


def child_pids(pid):
    """The pids of a process's children (a master's workers); none once it is gone."""
    import psutil
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


class Process:
    """A child process we started; stop() ends it (and only it) by pid."""

    def __init__(self, argv, env=None, cwd=ROOT, log_path=None, own_session=False):
        self.argv = argv
        self.log_path = log_path
        # "-": share our terminal; a path: append there; None: discard
        self._log = None if log_path == "-" else open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=own_session)
        self.pid = self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def signal(self, signum):
        """Signal the process if it still runs. It may end, and be reaped by gevent's child
        watcher in a patched caller, between the check and the signal: that is not an error."""
        if self.alive():
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, grace=10.0):
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
            self._log = subprocess.DEVNULL
        return self.popen.returncode

    def log_tail(self, lines=30):
        if not self.log_path or self.log_path == "-" or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as log:
            return b"\n".join(log.read().splitlines()[-lines:]).decode("utf-8", "replace")


class CleanUp:
    """The first SIGTERM or Ctrl-C raises KeyboardInterrupt, so that a command ends through
    the clean-up Ctrl-C takes (every process it started stopped by pid, every temporary
    tree removed); a later one only hurries it (`hurry`: no more waiting for what may be
    cut short), never cuts it short."""

    hurry = False

    @classmethod
    def interrupt(cls, _signum, _frame):
        cls.begin()
        raise KeyboardInterrupt

    @classmethod
    def begin(cls):
        """The clean-up has begun: from now on a signal only hurries it."""
        signal.signal(signal.SIGTERM, cls.hurry_up)
        signal.signal(signal.SIGINT, cls.hurry_up)

    @classmethod
    def hurry_up(cls, _signum, _frame):
        cls.hurry = True

    @classmethod
    def arm(cls):
        """The next signal interrupts. SIGINT too: Python leaves it ignored when it
        starts ignored (a script's background job), and a SIGINT sent on purpose must still
        end the command through its clean-up."""
        signal.signal(signal.SIGTERM, cls.interrupt)
        signal.signal(signal.SIGINT, cls.interrupt)

    @classmethod
    @contextlib.contextmanager
    def armed(cls):
        """CleanUp's rule inside; the handlers from before are back on the way out (a test
        that calls a command's main keeps its own)."""
        previous = [(signum, signal.getsignal(signum)) for signum in (signal.SIGTERM, signal.SIGINT)]
        cls.hurry = False
        cls.arm()
        try:
            yield cls
        finally:
            for signum, handler in previous:
                signal.signal(signum, handler)


def wait_until(check, timeout, what, process=None, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError("%s: the process exited early (code %s)\n%s"
                               % (what, process.popen.returncode, process.log_tail()))
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(interval)
    raise RuntimeError("%s: not ready after %gs\n%s" % (what, timeout, process.log_tail() if process else ""))


class RedisServer(Process):
    """A real redis-server on a loopback port, its data in its own directory."""

    def __init__(self, workdir=None, port=None, appendonly=True, own_session=False, bind=LOOPBACK):
        """`bind`: the address it listens on (another address lets other hosts share it)."""
        exe = system_packages.find("redis-server")
        if exe is None:
            raise system_packages.MissingProgram(["redis-server"])
        self.workdir = workdir or tempfile.mkdtemp(prefix="chattle-redis-")
        self.bind = bind
        self.port = port or free_port(bind)
        self.url = "redis://%s:%d/0" % (bind, self.port)
        argv = [exe, "--port", str(self.port), "--bind", bind, "--dir", self.workdir,
                "--save", "", "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
                "--protected-mode", "yes" if bind == LOOPBACK else "no", "--maxclients", "10000"]
        # own_session: a Ctrl-C at the terminal reaches only the orchestrator, which then
        # stops what it started in order (load first, then servers) and writes its report.
        super().__init__(argv, cwd=self.workdir, log_path=os.path.join(self.workdir, "redis.log"),
                         own_session=own_session)
        wait_until(self.ping, 10, "redis-server on port %d" % self.port, self)

    def ping(self):
        with socket.create_connection((self.bind, self.port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")

    def restart(self):
        """Stop and start again on the same port and directory (AOF replays)."""
        self.stop()
        self.__init__(self.workdir, self.port, appendonly=True, bind=self.bind)


def compile_server_modules(root):
    """Byte-compile the modules a server imports from `root` (every chattle_*.py;
    chattle itself under gunicorn) and the fault wrapper, before it starts. A server that
    compiled them from source at start-up (a fresh worktree, or PYTHONDONTWRITEBYTECODE
    set) grew less while holding polls, the compiler's freed memory being reused, it
    seems: 684 KiB for 100 held polls against 760 KiB from bytecode, and 1376 against 1660
    KiB for 200. So memory per held poll came out 10 % or more lower on whichever side of a
    comparison had no bytecode. compileall writes whatever the environment says."""
    for directory in (root, BENCH_SERVER_DIR):
        compileall.compile_dir(directory, maxlevels=0, quiet=2)


class ChattleServer(Process):
    """Chattle under `python chattle.py` (one process) or gunicorn with N gevent workers."""

    def __init__(self, port=None, workers=1, redis_url=None, env=None, log_path=None, gunicorn=None,
                 python=sys.executable, extra_args=(), own_session=False, root=ROOT, bind=LOOPBACK, environ=None):
        """`root`: the checkout whose chattle.py runs (`make regress BASE=` runs another revision's);
        `bind`: the address it listens on (loopback unless other hosts must reach it); `environ`:
        the environment `env` adds to (os.environ)."""
        self.port = port or free_port(bind)
        self.url = "http://%s:%d" % (bind, self.port)
        self.workers = workers
        full_env = dict(os.environ if environ is None else environ)
        full_env.update(env or {})
        full_env["PYTHONUNBUFFERED"] = "1"
        if redis_url:
            full_env["CHATTLE_REDIS_URL"] = redis_url
        self.gunicorn = workers > 1 if gunicorn is None else gunicorn
        # A deliberate fault asked for (CHATTLE_BENCH_*): chattle through the harness's
        # wrapper, which installs it; the product itself carries none.
        self.faulted = any(bench_environment(full_env).values())
        if self.faulted:  # the wrapper runs from the harness's directory: it wraps `root`'s chattle
            full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, full_env.get("PYTHONPATH")]))
        if self.gunicorn:
            app = ["--pythonpath", BENCH_SERVER_DIR, "bench_server:app"] if self.faulted else ["chattle"]
            argv = [python, "-m", "gunicorn", "--config", os.path.join(root, "gunicorn.conf.py"),
                    "--bind", "%s:%d" % (bind, self.port), "--workers", str(workers), *extra_args, *app]
        else:
            script = BENCH_SERVER if self.faulted else os.path.join(root, "chattle.py")
            argv = [python, script, "--host", bind, "--port", str(self.port), *extra_args]
        if log_path is None:
            log_path = tempfile.mkstemp(prefix="chattle-server-", suffix=".log")[1]
        compile_server_modules(root)
        super().__init__(argv, env=full_env, cwd=root, log_path=log_path, own_session=own_session)
        try:
            wait_until(self.healthy, 30, "chattle on %s" % self.url, self)
            if self.gunicorn:
                wait_until(lambda: len(self.worker_pids()) >= workers, 30, "%d gunicorn workers" % workers, self)
        except BaseException:  # never ready, or interrupted meanwhile: the server must not outlive its caller
            self.stop()
            raise

    def healthy(self):
        return answers_health(self.url)

    def worker_pids(self):
        """The pids that serve requests: gunicorn's workers, or the single process."""
        return child_pids(self.pid) if self.gunicorn else [self.pid]


class SeedGunicorn(Process):
    """The seed's deployment command as it stands, `gunicorn --bind 0.0.0.0:8080 --worker-class
    gevent --workers 1 chattle`, on a loopback port, run from the repository root so that
    gunicorn.conf.py is read from there as in use; with the gunicorn of `bin_dir`'s venv."""

    def __init__(self, bin_dir=None, port=None, log_path=None):
        bin_dir = bin_dir or os.path.dirname(sys.executable)
        self.port = port or free_port()
        self.url = "http://%s:%d" % (LOOPBACK, self.port)
        if log_path is None:
            log_path = tempfile.mkstemp(prefix="seed-gunicorn-", suffix=".log")[1]
        super().__init__([os.path.join(bin_dir, "gunicorn"), "--bind", "%s:%d" % (LOOPBACK, self.port),
                          *SEED_FLAGS], log_path=log_path)
        wait_until(self.healthy, 30, "the seed's gunicorn on %s" % self.url, self)

    def healthy(self):
        return answers_health(self.url)


class PeerServer(Process):
    """A reference server of bench/peers/ (one process, in-memory), measured beside Chattle."""

    def __init__(self, module="bench.peers.aiohttp_chat", port=None, log_path=None, python=sys.executable,
                 args=()):
        self.port = port or free_port()
        self.url = "http://%s:%d" % (LOOPBACK, self.port)
        if log_path is None:
            log_path = tempfile.mkstemp(prefix="peer-server-", suffix=".log")[1]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        super().__init__([python, "-m", module, "--host", LOOPBACK, "--port", str(self.port), *args], env=env,
                         log_path=log_path)
        wait_until(self.healthy, 30, "%s on %s" % (module, self.url), self)

    def healthy(self):
        return answers_health(self.url)

    def worker_pids(self):
        return [self.pid]
