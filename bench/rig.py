"""The lean client rig: park N long-polls on raw sockets, post once, time every answer.

No Locust and no HTTP library: each held poll is one non-blocking socket in an
epoll set, so the client costs little CPU next to the server it measures. Each answer is
timed at its kernel arrival (SO_TIMESTAMPNS, instruments/stamps.py), as the load test's are:
timed at the read, the rig's p50 took in its own queue of unread answers (about 30 ms
at 5 000 polls), and the two instruments disagreed by a third. Each poll is a keep-alive
request, as the page's and the load test's are: with `Connection: close` the server also
closed every socket inside its fan-out, which took the median p50 at 5 000 polls from
80 to 93 ms and p99 from 163 to 183 ms (one sweep each, same machine, same hour). And
the rig reads as the load test's driver does: once a fan-out is on and nothing is left
to read, it sleeps a millisecond instead of blocking in epoll_wait. On loopback the
server's send does the client socket's receive work, and waking a client asleep in
epoll_wait is part of it: a rig woken per answer made the server's fan-out of 5 000 take
a third longer and cost it a quarter more CPU (median p50 80 against 61 ms, p99 163
against 121 ms, 0.30-0.35 against 0.23-0.26 s per fan-out), a cost no server pays for a
client on another host. A held poll
count larger than one process should hold is split over several client processes
(`python -m bench.rig --park ...`, one JSON line out when parked and one when done),
all on 127.0.0.1.

    rig = Rig("http://127.0.0.1:8080", room="bench")
    point = rig.run(5000, server_pids=[1234])   # park, confirm, post, collect
"""

import argparse
import errno
import json
import os
import select
import selectors
import socket
import subprocess
import sys
import time
import urllib.parse

from bench.wires import CHATTLE, POLL_TIMEOUT, WIRES
from chattle_limits import client_timeout, raise_descriptor_limit
from harness.processes import ROOT
from harness.tls import ClientTls, client_context
from instruments.httpframe import FramingError, ResponseParser
from instruments.measures import (
    DeliveryLedger,
    client_bound,
    client_lag,
    kernel_memory,
    kernel_memory_per_connection,
    latency_summary,
    machine_busy_seconds,
    memory_per_connection,
    process_cpu_seconds,
    summed_rss,
    wakeup_latency,
)
from instruments.stamps import ANCILLARY_SPACE, SO_TIMESTAMPNS, arrival

COALESCE_SECONDS = 0.001  # a fan-out on and nothing to read: sleep, as the load test's driver does
PER_PROCESS = 8000         # sockets per client process, well under the 20000 descriptor limit
CLIENT_DESCRIPTOR_MARGIN = 64  # a client process's own pipes, epoll and interpreter files
IP_BIND_ADDRESS_NO_PORT = 24   # linux/in.h: pick the source port at connect, per destination
NR_OPEN = "/proc/sys/fs/nr_open"
HOLD_STALL_SECONDS = 10.0  # held polls not rising for this long: the server holds no more
BUSY_WINDOW_MIN = 0.1     # seconds: the shortest fan-out whose busy cores /proc/stat's ticks can tell


def raise_open_file_limit(wanted=None):
    """Raise RLIMIT_NOFILE, soft and hard, towards `wanted` (default: as far as allowed).

    The shell's hard limit (20000 here) is not the machine's: root (CAP_SYS_RESOURCE)
    may raise it up to fs.nr_open, and every process started afterwards (servers, client
    processes) inherits it. Returns (soft, hard) after; never lowers either."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open(NR_OPEN) as source:
            ceiling = int(source.read())
    except (OSError, ValueError):
        ceiling = hard
    target = ceiling if wanted is None else min(max(wanted, soft), ceiling)
    if target > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
        except (ValueError, OSError):
            pass  # not ours to raise: preflight names the command
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(target, hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def polls_per_client_process():
    """Sockets one client process may hold under its descriptor limit."""
    import resource
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(1, min(PER_PROCESS, soft - CLIENT_DESCRIPTOR_MARGIN))


def source_address(index):
    """Client process `index`'s own loopback source: 127.0.0.1, .2, ... then 127.0.1.x."""
    return "127.0.%d.%d" % (index // 254, index % 254 + 1)


def cpu_seconds_self():
    times = os.times()
    return times.user + times.system


# -- the client process -----------------------------------------------------------------

class Poll:
    __slots__ = ("sock", "parser", "received_at", "read_at", "body", "tls")

    def __init__(self, sock, tls=None):
        self.sock = sock
        self.tls = tls          # a harness.tls.ClientTls for an https:// server
        self.parser = ResponseParser()
        self.received_at = None
        self.read_at = None
        self.body = None

    def feed(self, data):
        """Append bytes; True once the whole answer is in (framed by instruments.httpframe, the
        parser the load test's client uses too)."""
        response = self.parser.feed(data)
        if response is None:
            return False
        self.body = response.body
        return True

    def feed_eof(self):
        """The server closed: True if that completed a close-delimited answer."""
        try:
            response = self.parser.feed_eof()
        except FramingError:
            return False
        if response is None:
            return False
        self.body = response.body
        return True


def park_and_collect(host, port, room, cursor, count, connect_timeout=10.0, hold_only=False,
                     out=sys.stdout, stdin=sys.stdin, source=None, wire=CHATTLE, tls_context=None):
    """Open `count` polls from `cursor` (the wire's encode_cursor; from address `source` when
    given), report "parked" with the connect errors by name, then time their answers. With
    `tls_context` each poll speaks TLS to `host` (kept in memory: the answer's arrival is still
    the kernel's stamp of its encrypted bytes, and decrypting it is the client's lag)."""
    raise_descriptor_limit()
    request = wire.poll_request(host, port, room, cursor)
    # select.epoll itself, not selectors: its per-event bookkeeping would double the
    # client's CPU per answer and push the rig towards being the bottleneck.
    epoll = select.epoll()
    by_fd = {}
    polls, failed, errors = [], 0, {}
    deadline = time.monotonic() + connect_timeout + count / 500.0
    for _ in range(count):
        if time.monotonic() > deadline:
            failed += 1
            errors["deadline"] = errors.get("deadline", 0) + 1
            continue
        try:
            # A blocking connect returns once the kernel has the handshake: the server's
            # accept loop keeps pace with it, so the backlog never overflows.
            sock = connect(host, port, source, connect_timeout)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            tls = None
            if tls_context is not None:
                tls = ClientTls(tls_context, host)
                tls.handshake_blocking(sock)
            sock.sendall(tls.encrypt(request) if tls is not None else request)
            sock.setblocking(False)
        except OSError as error:
            failed += 1
            # EMFILE: descriptors, EADDRNOTAVAIL: ports, ENOBUFS/ENOMEM: memory
            name = errno.errorcode.get(error.errno, type(error).__name__)
            errors[name] = errors.get(name, 0) + 1
            if isinstance(error, TimeoutError):
                # on loopback a connect times out only once the server stops accepting
                # (its backlog full): the rest would each wait as long, to the same end
                deadline = 0
            continue
        poll = Poll(sock, tls)
        polls.append(poll)
        epoll.register(sock.fileno(), select.EPOLLIN)
        by_fd[sock.fileno()] = poll
    out.write(json.dumps({"parked": len(polls), "failed": failed, "errors": errors}) + "\n")
    out.flush()
    if hold_only:
        stdin.readline()  # the parent says when to let go
        for poll in polls:
            poll.sock.close()
        return
    cpu_parked = cpu_seconds_self()
    pending = len(polls)
    deadline = time.monotonic() + client_timeout(POLL_TIMEOUT)
    answering = False
    while pending and time.monotonic() < deadline:
        events = epoll.poll(0)
        if not events:
            if answering:
                answering = False
                time.sleep(COALESCE_SECONDS)
            else:
                events = epoll.poll(1.0)
            if not events:
                continue
        answering = True
        for fd, _mask in events:
            poll = by_fd[fd]
            try:
                # an answer is a few hundred bytes; its kernel arrival ends the latency
                data, ancillary, _flags, _address = poll.sock.recvmsg(8192, ANCILLARY_SPACE)
                arrived_at = arrival(ancillary)
            except BlockingIOError:
                continue
            except OSError:
                data, arrived_at = b"", None
            if data and poll.tls is not None:
                data = poll.tls.decrypt(data)
                if data == b"":
                    continue        # a record not yet whole
                data = data or b""  # None: the server ended the session
            try:
                complete = poll.feed(data) if data else poll.feed_eof()
            except FramingError:
                complete = False
            if data and not complete:
                continue
            if complete:
                read_at = time.time()
                poll.received_at = arrived_at if arrived_at is not None else read_at
                poll.read_at = read_at
            # else: closed before a whole answer; it stays unanswered, never a delivery
            epoll.unregister(fd)  # closed after the timing: a close is not a delivery
            pending -= 1
    cpu_collect = cpu_seconds_self() - cpu_parked
    for poll in polls:
        poll.sock.close()
    epoll.close()
    answered = [poll for poll in polls if poll.received_at is not None]
    out.write(json.dumps({
        "received_at": [poll.received_at for poll in answered],
        "client_lag": [client_lag(poll.read_at, poll.received_at) for poll in answered],
        "bodies_ok": sum(1 for poll in answered if poll.body is not None),
        "first_ids": [wire.first_id(poll.body) for poll in answered],
        "unanswered": len(polls) - len(answered),
        "cpu_seconds": cpu_collect,
    }) + "\n")
    out.flush()


def connect(host, port, source, timeout):
    """A blocking connect, from `source` when given (its port picked per destination)."""
    if source is None:
        return socket.create_connection((host, port), timeout=timeout)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


# -- the parent: spreads the polls, confirms they are held, posts, gathers ----------------

def held_waiters(url, expected_pids=None, probes=40, per_pid=None, wire=CHATTLE, ca_file=""):
    """Polls held right now, summed over the workers that answer /stats.

    /stats answers for whichever worker accepts the connection, so with several workers
    one probe sees one worker: probe many times on fresh connections and keep the
    newest figure of each pid. While polls are being parked the figure only rises, so
    the newest is also the largest seen. A server that counts for all its workers at once
    (Nchan) answers with no pid: one probe is its figure.
    """
    per_pid = {} if per_pid is None else per_pid
    for _ in range(probes):
        try:
            answer = wire.held(url, ca_file=ca_file)
        except OSError:
            break  # a server that stopped accepting: its figure stays where it was
        if answer is not None:
            per_pid[answer[0]] = answer[1]
            if answer[0] is None:
                break
        if expected_pids and set(expected_pids) <= set(per_pid):
            break
    return sum(per_pid.values()), per_pid


def wait_until_held(url, count, expected_pids=None, timeout=60.0, stall=None, wire=CHATTLE, ca_file=""):
    """Probe /stats until the summed waiters reach `count` (or the deadline passes, or,
    given `stall`, the figure has not risen for that many seconds: a full server)."""
    deadline = time.monotonic() + timeout
    per_pid = {}
    held = 0
    rose_at, highest = time.monotonic(), -1
    while time.monotonic() < deadline:
        held, per_pid = held_waiters(url, expected_pids, probes=max(4, 4 * len(expected_pids or [1])),
                                     per_pid=per_pid, wire=wire, ca_file=ca_file)
        if held >= count:
            break
        if held > highest:
            rose_at, highest = time.monotonic(), held
        elif stall is not None and time.monotonic() - rose_at > stall:
            break
        time.sleep(0.2)
    return held, per_pid


def machine_memory_in_use():
    """Bytes of this machine's memory not available to new work (total - MemAvailable)."""
    import psutil
    memory = psutil.virtual_memory()
    return memory.total - memory.available


def cpu_seconds_of(pids):
    """Summed CPU seconds of the live ones among `pids` (instruments.measures.process_cpu_seconds)."""
    total = 0.0
    for pid in pids:
        try:
            total += process_cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            pass  # gone
    return total


class Rig:
    def __init__(self, url, room="bench", per_process=None, spread_sources=False, rooms=None, wire=CHATTLE,
                 ca_file=""):
        """`spread_sources`: client process i connects from 127.0.0.(1+i), so the polls are
        not bounded by one source address's ephemeral ports (needs a loopback server).
        `rooms`: spread the polls evenly over these rooms instead of one (a client process
        per room at least), and post once to each, one post right after the other. `wire`: the
        protocol the server speaks (bench.wires: Chattle's, or Nchan's)."""
        self.wire = wire
        self.url = url.rstrip("/")
        parsed = urllib.parse.urlsplit(self.url)
        self.host, self.port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
        self.ca_file = ca_file  # https://: the CA its certificate is checked against ("": the system's)
        self.rooms = list(rooms) if rooms else [room]
        self.room = self.rooms[0]
        self.per_process = per_process or polls_per_client_process()
        self.spread_sources = spread_sources

    def cursor(self, room=None):
        """The room's position (Chattle's: its last id), posting one message first if it has none."""
        return self.wire.cursor(self.url, room or self.room, ca_file=self.ca_file)

    def cursors(self):
        """{room: its position} of every room the rig polls."""
        return {room: self.cursor(room) for room in self.rooms}

    def start_clients(self, count, cursors, hold_only=False):
        """Client processes holding `count` polls spread evenly over the rooms of `cursors`
        ({room: since}); each process knows its room as `.room`."""
        clients = []
        for index, room in enumerate(cursors):
            remaining = count // len(cursors) + (index < count % len(cursors))
            while remaining > 0:
                share = min(self.per_process, remaining)
                argv = [sys.executable, "-m", "bench.rig", "--park", str(share), "--url", self.url,
                        "--room", room, "--cursor", self.wire.encode_cursor(cursors[room]), "--wire", self.wire.name]
                if hold_only:
                    argv.append("--hold-only")
                if self.ca_file:
                    argv += ["--ca-file", self.ca_file]
                if self.spread_sources:
                    argv += ["--source", source_address(len(clients))]
                client = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                client.room = room
                clients.append(client)
                remaining -= share
        return clients

    @staticmethod
    def read_line(client, what, timeout):
        """One JSON line from a client process, bounded by its own deadline."""
        ready = selectors.DefaultSelector()
        ready.register(client.stdout, selectors.EVENT_READ)
        if not ready.select(timeout):
            client.kill()
            raise RuntimeError("client %d: no %s line within %gs" % (client.pid, what, timeout))
        line = client.stdout.readline()
        if not line:
            raise RuntimeError("client %d exited before its %s line (code %s)" % (client.pid, what, client.wait()))
        return json.loads(line)

    def run(self, count, server_pids=None, rss_idle=None, backend_cpu=None):
        """Park `count` polls, confirm they are held, post once, time every answer.
        `backend_cpu`: a callable giving the CPU seconds the server's Redis has used so far,
        read around the fan-out as the server's are."""
        cursors = self.cursors()
        if server_pids and rss_idle is None:
            rss_idle = summed_rss(server_pids)
        machine_idle = machine_memory_in_use()
        kernel_idle = kernel_memory()
        clients = self.start_clients(count, cursors)
        try:
            return self.park_post_collect(clients, count, cursors, server_pids, rss_idle, machine_idle, backend_cpu,
                                          kernel_idle)
        finally:
            for client in clients:
                if client.poll() is None:
                    client.kill()
                    client.wait(10)

    def park(self, clients, count, server_pids):
        """Read every client's "parked" line and wait until the server holds them (or stops
        taking more): requested, parked, connect errors by name, held (summed and per pid)."""
        parked_lines = [self.read_line(c, "parked", 60 + count / 200.0) for c in clients]
        parked = sum(line["parked"] for line in parked_lines)
        connect_errors = {}
        for line in parked_lines:
            for name, times in line.get("errors", {}).items():
                connect_errors[name] = connect_errors.get(name, 0) + times
        held, per_pid = wait_until_held(self.url, parked, server_pids, timeout=30 + count / 500.0,
                                        stall=HOLD_STALL_SECONDS, wire=self.wire, ca_file=self.ca_file)
        return {"requested": count, "parked": parked, "connect_errors": connect_errors,
                "client_processes": len(clients), "held_confirmed": held,
                "held_per_pid": {str(k): v for k, v in per_pid.items()}}

    def hold(self, count, server_pids=None):
        """Park `count` polls and hold them without a post: how many the server holds, and
        what stopped more (the connect errors, the per-process counts)."""
        clients = self.start_clients(count, self.cursors(), hold_only=True)
        try:
            return dict(self.park(clients, count, server_pids),
                        rss_holding=summed_rss(server_pids) if server_pids else None)
        finally:
            for client in clients:  # a line on stdin lets go
                try:
                    client.stdin.write("\n")
                    client.stdin.flush()
                except OSError:
                    pass
            for client in clients:
                try:
                    client.wait(30)
                except subprocess.TimeoutExpired:
                    client.kill()
                    client.wait(10)

    def park_post_collect(self, clients, count, cursors, server_pids, rss_idle, machine_idle, backend_cpu=None,
                          kernel_idle=None):
        hold = self.park(clients, count, server_pids)
        parked, held = hold["parked"], hold["held_confirmed"]
        if held < parked:
            # The server holds fewer than it accepted a connection for: it is full, and a post
            # would only wait on it. No fan-out is measured; the hold is the finding.
            return dict(hold, delivered=0, unanswered=parked, complete_listeners=0,
                        latency=latency_summary([]), client_lag=latency_summary([]), last_delivery_s=None,
                        client_cpu_s=0.0, server_cpu_s=None, redis_cpu_s=None, client_bound=False,
                        rss_idle=rss_idle, latency_from_send=latency_summary([]), kernel_per_poll=None,
                        rss_holding=None, bytes_per_poll=None, machine_bytes_per_poll=None)
        time.sleep(0.3)  # let the last accepted sockets settle before reading memory
        rss_holding = summed_rss(server_pids) if server_pids else None
        machine_holding = machine_memory_in_use()
        kernel_holding = kernel_memory()
        cpu_before = cpu_seconds_of(server_pids) if server_pids else None
        backend_before = backend_cpu() if backend_cpu else None
        posted_at = time.time()
        busy_before, wall_before = machine_busy_seconds(), time.monotonic()
        answers = {room: self.wire.post(self.url, room, cursors[room], ca_file=self.ca_file) for room in cursors}
        results = [self.read_line(c, "results", POLL_TIMEOUT + 30) for c in clients]
        for client in clients:
            client.wait(10)
        # how many of the machine's cores were busy through the fan-out, whoever kept them busy; /proc/stat
        # counts in ticks of 10 ms, so a shorter fan-out gets no figure rather than a wrong one
        window = time.monotonic() - wall_before
        busy_cores = (machine_busy_seconds() - busy_before) / window if window >= BUSY_WINDOW_MIN else None
        cpu_server = cpu_seconds_of(server_pids) - cpu_before if server_pids else None
        cpu_backend = backend_cpu() - backend_before if backend_cpu else None
        received = [t for r in results for t in r["received_at"]]
        latencies = [wakeup_latency(t, answers[client.room]["ts"])
                     for client, result in zip(clients, results) for t in result["received_at"]]
        # the same answers from the rig's send of the post: Nchan's origin, beside Chattle's ts
        from_send = [wakeup_latency(t, answers[client.room]["sent"])
                     for client, result in zip(clients, results) for t in result["received_at"]]
        ledgers = 0
        for client, result in zip(clients, results):
            for first_id in result["first_ids"]:
                ledger = DeliveryLedger(self.wire.sequence(cursors[client.room]))
                if first_id is not None:
                    ledger.record(first_id)
                ledgers += ledger.complete(answers[client.room]["id"])
        cpu_client = sum(r["cpu_seconds"] for r in results)
        lag = latency_summary([seconds for r in results for seconds in r.get("client_lag", ())])
        latency = latency_summary(latencies)
        point = dict(hold, **{
            "unanswered": sum(r["unanswered"] for r in results),
            "client_lag": lag,
            "delivered": len(received),
            "complete_listeners": ledgers,
            "latency": latency,
            "latency_from_send": latency_summary(from_send),
            "last_delivery_s": (max(received) - posted_at) if received else None,
            "client_cpu_s": cpu_client,
            "machine_busy_cores": busy_cores,
            "server_cpu_s": cpu_server,
            "redis_cpu_s": cpu_backend,
            # the shared rule (the load test's, make capacity's): the client's own lag, not its CPU
            "client_bound": client_bound(lag["p99"], latency["p99"]),
            "rss_idle": rss_idle,
            "rss_holding": rss_holding,
            "bytes_per_poll": memory_per_connection(rss_idle, rss_holding, parked) if rss_holding else None,
            # the whole machine's rise: both ends' sockets and the client processes too
            # (blurred by anything else running), what bounds the hold on one host
            "machine_bytes_per_poll": memory_per_connection(machine_idle, machine_holding, parked),
            # the kernel's part, both ends of every held connection (instruments.measures.kernel_memory)
            "kernel_per_poll": kernel_memory_per_connection(kernel_idle, kernel_holding, parked),
        })
        return point


# -- the small socket fan-out: a few hundred polls on blocking sockets of this process ------
# Cheaper to repeat than a rig run (no client processes): the pytest-benchmark suite
# times it, and so does `make regress BASE=` beside the rig.

def hold_polls(url, room, count, timeout=30.0):
    """Open `count` polls on the room's newest cursor; return them once the server holds them."""
    rig = Rig(url, room)
    held_before = wait_until_held(rig.url, 0, timeout=timeout)[0]
    request = ("GET /rooms/%s/msgs?since=%d&timeout=%d HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n"
               % (room, rig.cursor(), POLL_TIMEOUT, rig.host, rig.port)).encode()
    polls = []
    try:
        for _ in range(count):
            conn = socket.create_connection((rig.host, rig.port), timeout=timeout)
            polls.append(conn)
            conn.sendall(request)
        held = wait_until_held(rig.url, held_before + count, timeout=timeout)[0]
        if held < held_before + count:
            raise RuntimeError("the server holds %d of %d polls after %gs" % (held - held_before, count, timeout))
    except BaseException:
        for conn in polls:
            conn.close()
        raise
    return polls


def answer_polls(url, room, polls):
    """Post once and read every poll's answer to its end (Connection: close: the end is EOF).
    Returns the seconds from sending the post to the last poll's last byte, and how many
    polls were answered 200."""
    rig = Rig(url, room)
    body = b'{"from":"bench","content":"wake"}'
    started = time.perf_counter()
    with socket.create_connection((rig.host, rig.port), timeout=30) as conn:
        conn.sendall(b"POST /rooms/%s/msgs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (room.encode(), len(body), body))
        while conn.recv(65536):
            pass
    answered = 0
    for conn in polls:
        try:
            answer = conn.recv(65536)
            answered += answer.startswith(b"HTTP/1.1 200")
            while answer:
                answer = conn.recv(65536)
        finally:
            conn.close()
    return time.perf_counter() - started, answered


def main(argv=None):
    parser = argparse.ArgumentParser(description="Client process of the bench rig (started by bench.sweep)")
    parser.add_argument("--park", type=int, required=True, help="how many polls this process holds")
    parser.add_argument("--url", required=True, help="server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--room", default="bench", help="room to poll (default %(default)s)")
    parser.add_argument("--cursor", required=True,
                        help="where every poll starts: Chattle's since=, or Nchan's position as JSON")
    parser.add_argument("--wire", choices=sorted(WIRES), default=CHATTLE.name,
                        help="the protocol the server speaks (default %(default)s)")
    parser.add_argument("--hold-only", action="store_true",
                        help="park, report, then hold until stdin gets a line (no timing)")
    parser.add_argument("--source", help="loopback address to connect from (default: the kernel's choice)")
    parser.add_argument("--ca-file", default="", help="https:// --url: the CA its certificate is checked against "
                                                      "(default: the system's)")
    args = parser.parse_args(argv)
    parsed = urllib.parse.urlsplit(args.url)
    secure = parsed.scheme == "https"
    park_and_collect(parsed.hostname, parsed.port or (443 if secure else 80), args.room, args.cursor, args.park,
                     hold_only=args.hold_only, source=args.source, wire=WIRES[args.wire],
                     tls_context=client_context(args.ca_file) if secure else None)


if __name__ == "__main__":
    main()
