"""The process `make regress` runs under callgrind: chattle's real server and handler,
fed connections over socketpairs inside this one process, in phases.

    valgrind --tool=callgrind --dump-before=getppid python -m bench.callgrind_workload \\
        --fan-outs 1000,3000 --posts 200,600

Each phase lies between two calls of `os.getppid()`, the marker: callgrind writes one
dump of its counts before every call of getppid, so each dump after the first holds
exactly one phase's instructions (start-up is in the first, teardown in the last).
Nothing else in the process calls getppid. The phases, in order:

- warm-up: a small fan-out and a few posts, so first-use costs (imports, caches) are out;
- per fan-out size N: "park" (N poll connections accepted, their requests read and
  routed, the polls parked) and "answer" (one post over a connection; every held poll
  woken, answered, sent, its connection closed; the clients read their answers);
- per post count P: "post" (P connections, each posting one message and closed).

Differencing two sizes of a phase cancels what one fan-out or burst costs whatever its
size, and gives instructions per poll or per post.

A connection enters the server exactly where an accepted one does (`do_handle` with a
gevent socket around the descriptor, as gevent's accept loop makes it), so the path
measured is the server's, the handler's, bottle's and chattle's, minus the accept call.
The client ends are plain, non-blocking C sockets: a send and two reads per connection,
next to nothing beside the server's work.

Nothing in here depends on the wall clock or on who runs it: time.time() and
time.monotonic() stand still (see stop_the_clocks), so every deadline and tick is worked
out from one moment; a socketpair's bytes are in the peer's queue when send returns, so
every turn of the event loop finds the same sockets ready; no other thread runs; and no
timer of the event loop fires, since every TICK of chattle's modules (Wakeup's for held
polls, and any the HTTP layer keeps for its connections' deadlines) is made one tick for
the whole run, decades away. (bench.regress also fixes PYTHONHASHSEED and the environment.)
"""

import argparse
import itertools
import json
import os
import sys
import time

import gevent
from gevent import monkey
from gevent.socket import socket as GeventSocket

# chattle is imported in main(): importing it patches the standard library with gevent,
# and bench.regress imports this module for its names only.
chattle = None

raw_socketpair = monkey.get_original("socket", "socketpair")

ROOM = "regress"
POLL_TIMEOUT = 60
MAX_LOOP_TURNS = 1000  # bounded waits: every phase is done in a handful of turns
PHASE_MARKER = "getppid"  # the C function whose calls make callgrind dump (--dump-before)


def mark_phase():
    """End the current phase: callgrind dumps its counts before this call."""
    os.getppid()


# -- connections --------------------------------------------------------------------------

class Connection:
    """One client connection to the server, over a socketpair."""

    __slots__ = ("client", "received")

    def __init__(self, server, number):
        client, served = raw_socketpair()
        client.setblocking(False)
        descriptor = served.detach()
        # What gevent's accept loop hands the server for an accepted connection.
        server.do_handle(GeventSocket(served.family, served.type, served.proto, fileno=descriptor),
                         ("127.0.0.1", 40000 + number % 20000))
        self.client = client
        self.received = []

    def send(self, data):
        self.client.send(data)  # a request fits the socketpair's buffer: never partial

    def read_to_end(self):
        """Everything the server sent, once it has closed its end; False while it has not."""
        while True:
            try:
                chunk = self.client.recv(65536)
            except BlockingIOError:
                return False
            if not chunk:
                self.client.close()
                return True
            self.received.append(chunk)

    @property
    def answer(self):
        return b"".join(self.received)


def settle(connections):
    """Let the server run until it has closed every one of `connections`, then read them."""
    pending = list(connections)
    for _ in range(MAX_LOOP_TURNS):
        gevent.idle()  # runs until the event loop has nothing left to do
        pending = [connection for connection in pending if not connection.read_to_end()]
        if not pending:
            return
    raise RuntimeError("%d connections still open after %d loop turns" % (len(pending), MAX_LOOP_TURNS))


def poll_request(since):
    return ("GET /rooms/%s/msgs?since=%d&timeout=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Connection: close\r\n\r\n" % (ROOM, since, POLL_TIMEOUT)).encode()


def post_request(content):
    body = json.dumps({"from": "regress", "content": content}).encode()
    return (b"POST /rooms/%s/msgs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (ROOM.encode(), len(body), body))


def check_answers(connections, status, what):
    bad = [c.answer[:80] for c in connections if not c.answer.startswith(b"HTTP/1.1 " + status)]
    if bad:
        raise RuntimeError("%d of %d %s answers were not %s, e.g. %r"
                           % (len(bad), len(connections), what, status.decode(), bad[0]))


# -- phases -------------------------------------------------------------------------------

def post_burst(server, count):
    connections = [Connection(server, number) for number in range(count)]
    for number, connection in enumerate(connections):
        connection.send(post_request("message %d" % number))
    settle(connections)
    check_answers(connections, b"201", "post")


def fan_out(server, waiters, marked=True):
    """Park `waiters` polls, then post once and let every one be answered."""
    since = chattle.rooms.get(ROOM).last_id
    request = poll_request(since)
    polls = [Connection(server, number) for number in range(waiters)]
    for connection in polls:
        connection.send(request)
    for _ in range(MAX_LOOP_TURNS):
        gevent.idle()
        if chattle.rooms.waiters >= waiters:
            break
    if chattle.rooms.waiters != waiters:
        raise RuntimeError("%d of %d polls parked" % (chattle.rooms.waiters, waiters))
    if marked:
        mark_phase()  # the polls are parked
    post_burst(server, 1)
    settle(polls)
    check_answers(polls, b"200", "poll")
    if chattle.rooms.waiters:
        raise RuntimeError("%d polls still held after the fan-out" % chattle.rooms.waiters)


def stop_the_clocks():
    """time.time() and time.monotonic() return the moment the run started, for good.

    What the server does by the clock (the Date header formatted once a second, every
    deadline and tick worked out from "now") would otherwise happen as often as the run
    lasted, and a run under callgrind lasts as long as the machine's load makes it. A
    constant's __next__ is a C call, as cheap as the clocks it replaces. The event loop
    keeps its own clock, and with one tick for the run no timer of it fires."""
    time.time = itertools.repeat(time.time()).__next__
    time.monotonic = itertools.repeat(time.monotonic()).__next__


def one_deadline_tick():
    """Every class of chattle's modules that buckets due times by a TICK (Wakeup for held
    polls, and any the HTTP layer has for its connections) gets one tick for the whole
    run, so that no timer fires in it: a deadline timer that fired a few seconds into a
    run (natively it never would) would close connections at a moment of the wall
    clock's choosing. Returns their names."""
    ticked = []
    for name, module in sorted(sys.modules.items()):
        if name != "chattle" and not name.startswith("chattle_"):
            continue
        for value in vars(module).values():
            if (isinstance(value, type) and value.__module__ == name
                    and isinstance(vars(value).get("TICK"), float)):
                value.TICK = 1e9  # seconds: every due time of a run falls in tick 1
                ticked.append("%s.%s" % (name, value.__qualname__))
    if "chattle_rooms.Wakeup" not in ticked:
        raise SystemExit("bench.callgrind_workload: chattle_rooms.Wakeup.TICK is gone; the instruction counts "
                         "would depend on the machine's speed. Update one_deadline_tick().")
    return ticked


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fan-outs", default="1000,3000", help="held polls per fan-out, comma-separated")
    parser.add_argument("--posts", default="200,600", help="posts per burst, comma-separated")
    parser.add_argument("--warm-up", type=int, default=50, help="polls and posts of the warm-up")
    args = parser.parse_args(argv)
    global chattle
    stop_the_clocks()
    import chattle
    # instruments.provenance.bench_environment() by hand: the measured process imports
    # nothing of this repository but chattle, whose instructions alone it counts
    if any(name.startswith("CHATTLE_BENCH_") for name in os.environ):
        import harness.bench_server  # noqa: F401  (installs the faults asked for on chattle's app)
    fan_outs = [int(n) for n in args.fan_outs.split(",") if n]
    bursts = [int(n) for n in args.posts.split(",") if n]

    chattle.configure(chattle.Settings())
    ticked = one_deadline_tick()
    server = chattle.make_server("127.0.0.1", 0)
    # pywsgi would look the server's name up (getfqdn) on start, in a thread of gevent's
    # pool; the thread ends by itself seconds later, at a moment of the wall clock's
    # choosing, in whichever phase that falls. Named here, nothing is looked up.
    server.environ.setdefault("SERVER_NAME", "localhost")
    server.start()
    if len(os.listdir("/proc/self/task")) != 1:
        raise SystemExit("bench.callgrind_workload: another thread runs beside the measured one; what it "
                         "does would land in the phases at moments of the wall clock's choosing")
    chattle.get_bus().publish(ROOM, "regress", "first")
    chattle.tune_garbage_collector()  # as every serving process does, after start-up
    try:
        fan_out(server, args.warm_up, marked=False)
        post_burst(server, args.warm_up)
        for waiters in fan_outs:
            mark_phase()  # start: park
            fan_out(server, waiters)  # marks park | answer
        for count in bursts:
            mark_phase()  # start: post
            post_burst(server, count)
        mark_phase()  # end of the last phase
    finally:
        server.stop(timeout=1)
    # The parent checks that it got every phase it asked for.
    print(json.dumps({"fan_outs": fan_outs, "posts": bursts, "one_tick": ticked, "pid": os.getpid()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
