"""The soak's load: one small gevent process of plain sockets, started by bench/soak.py.

    python -m bench.soak_driver --url http://127.0.0.1:8080 --listeners 1000 --duration 600 \\
        --status status.json

What it keeps up, at a steady rate, for --duration seconds:
- listeners, each a keep-alive connection polling one room from its cursor; a set
  fraction leaves every minute (closing its socket, often in the middle of a held poll)
  and as many new ones join; a share asks short timeouts, so their polls time out; every
  listener closes its keep-alive connection after a few polls and opens a new one;
- rooms: a few that live for the whole run and short-lived ones that are left after
  --room-life seconds (their listeners move to a new room), so the server's rooms expire;
- posts at --posts-per-second into the live rooms, over a keep-alive connection that
  closes every few posts;
- hostile clients at --hostile-per-second: a connection that never sends, a head sent a
  byte at a time, a head over the server's limit.

Every --status-every seconds it writes its own figures to --status (atomically): open
sockets, greenlets, descriptors, and counts of what it did and what went wrong. Its
descriptors beyond its open sockets and its greenlets beyond its clients are read in one
step of its event loop, so they are exact: the soak judges its load process as it judges
the server.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402

import gevent  # noqa: E402

from chattle_limits import client_timeout, raise_descriptor_limit  # noqa: E402
from instruments.httpframe import FramingError, ResponseParser  # noqa: E402

POLLS_PER_CONNECTION = 20      # a listener's keep-alive connection closes after this many polls
POSTS_PER_CONNECTION = 50      # and the poster's after this many posts
SHORT_TIMEOUT_SHARE = 0.2      # listeners whose polls ask a short timeout (and so time out)
SHORT_TIMEOUT = 3
HOSTILE_CAP = 30.0             # seconds a hostile client waits for the server to close it
OVERSIZED_HEAD = 48 * 1024     # over the server's 32 KiB head limit


class Counters(dict):
    def add(self, name, count=1):
        self[name] = self.get(name, 0) + count


class Driver:
    def __init__(self, args):
        parsed = urllib.parse.urlsplit(args.url)
        self.address = (parsed.hostname, parsed.port or 80)
        self.args = args
        self.random = random.Random(args.seed)
        self.sockets = set()      # every socket this process has open
        self.clients = set()      # every greenlet that is a client (listener, poster, hostile)
        self.listeners = {}       # greenlet -> room
        self.long_rooms = ["soak-%d-long-%d" % (args.seed, i) for i in range(args.long_rooms)]
        self.short_rooms = {}     # room -> monotonic time it is left
        self.room_number = 0
        self.counters = Counters()
        self.stopping = False
        self.started = time.monotonic()

    # -- sockets, counted --------------------------------------------------------------
    def connect(self):
        # Counted from its creation, not from the connect's end: the count must hold while
        # other connects are under way.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sockets.add(sock)
        try:
            sock.settimeout(10)
            sock.connect(self.address)
        except BaseException:
            self.close(sock)
            raise
        return sock

    def close(self, sock):
        if sock is not None:
            self.sockets.discard(sock)
            sock.close()

    def spawn(self, function, *args):
        client = gevent.spawn(function, *args)
        self.clients.add(client)
        client.link(self.clients.discard)
        return client

    # -- rooms -------------------------------------------------------------------------
    def new_short_room(self, life=None):
        self.room_number += 1
        name = "soak-%d-short-%d" % (self.args.seed, self.room_number)
        self.short_rooms[name] = time.monotonic() + (self.args.room_life if life is None else life)
        return name

    def live_rooms(self):
        return self.long_rooms + list(self.short_rooms)

    def roll_rooms(self):
        """Leave the short rooms whose time is up: their listeners move to new ones."""
        now = time.monotonic()
        for room, until in list(self.short_rooms.items()):
            if until > now:
                continue
            del self.short_rooms[room]
            new_room = self.new_short_room()
            self.counters.add("rooms_left")
            for listener, its_room in list(self.listeners.items()):
                if its_room == room:
                    self.leave(listener)
                    self.join(new_room)

    # -- listeners ---------------------------------------------------------------------
    def join(self, room=None):
        room = room or self.random.choice(self.live_rooms())
        timeout = SHORT_TIMEOUT if self.random.random() < SHORT_TIMEOUT_SHARE else self.args.poll_timeout
        listener = self.spawn(self.listen, room, timeout)
        self.listeners[listener] = room
        listener.link(self.ended)

    def ended(self, listener):
        self.listeners.pop(listener, None)  # ended on an error: churn() replaces it

    def leave(self, listener):
        self.listeners.pop(listener, None)
        listener.kill(block=False)  # its socket closes in its finally, mid-poll or not
        self.counters.add("listeners_left")

    def listen(self, room, timeout):
        cursor = None
        sock = None
        parser = None
        polls_on_connection = 0
        try:
            while not self.stopping:
                if sock is None:
                    sock = self.connect()
                    sock.settimeout(client_timeout(timeout))
                    parser = ResponseParser()
                    polls_on_connection = 0
                query = "timeout=%d" % timeout + ("&since=%d" % cursor if cursor is not None else "&limit=1")
                polls_on_connection += 1
                last = polls_on_connection >= POLLS_PER_CONNECTION
                sock.sendall(("GET /rooms/%s/msgs?%s HTTP/1.1\r\nHost: soak\r\n%s\r\n"
                              % (room, query, "Connection: close\r\n" if last else "")).encode())
                answer = self.read_answer(sock, parser)
                if answer is None or answer.status != 200:
                    self.counters.add("poll_failed" if answer is None else "poll_status_%d" % answer.status)
                    self.close(sock)
                    sock = None
                    gevent.sleep(1.0)
                    continue
                body = json.loads(answer.body)
                self.counters.add("polls_answered")
                if not body["messages"] and cursor is not None:
                    self.counters.add("polls_timed_out")
                cursor = body["cursor"]
                if last or not answer.keep_alive:
                    self.close(sock)
                    sock = None
                    self.counters.add("keepalive_closed")
        except (OSError, ValueError, FramingError) as exc:
            self.counters.add("listener_error_%s" % type(exc).__name__)
        finally:
            self.close(sock)

    @staticmethod
    def read_answer(sock, parser):
        while True:
            data = sock.recv(65536)
            if not data:
                return parser.feed_eof()
            answer = parser.feed(data)
            if answer is not None:
                return answer

    # -- posts -------------------------------------------------------------------------
    def post(self):
        sock = parser = None
        posts_on_connection = 0
        interval = 1.0 / self.args.posts_per_second
        due = time.monotonic()
        try:
            while not self.stopping:
                due += interval
                gevent.sleep(max(0.0, due - time.monotonic()))
                if sock is None:
                    sock = self.connect()
                    parser = ResponseParser()
                    posts_on_connection = 0
                posts_on_connection += 1
                last = posts_on_connection >= POSTS_PER_CONNECTION
                body = json.dumps({"from": "soak", "content": "message %d" % self.counters.get("posts", 0)}).encode()
                room = self.random.choice(self.live_rooms())
                sock.sendall(b"POST /rooms/%s/msgs HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n%s\r\n%s"
                             % (room.encode(), len(body), b"Connection: close\r\n" if last else b"", body))
                answer = self.read_answer(sock, parser)
                if answer is None or answer.status != 201:
                    self.counters.add("post_failed" if answer is None else "post_status_%d" % answer.status)
                else:
                    self.counters.add("posts")
                if last or answer is None or not answer.keep_alive:
                    self.close(sock)
                    sock = None
        except (OSError, ValueError, FramingError) as exc:
            self.counters.add("poster_error_%s" % type(exc).__name__)
            if not self.stopping:
                self.spawn(self.post)  # the rate goes on
        finally:
            self.close(sock)

    # -- hostile clients -----------------------------------------------------------------
    def hostile(self, kind):
        sock = None
        try:
            sock = self.connect()
            sock.settimeout(HOSTILE_CAP)
            if kind == "oversized_head":
                sock.sendall(b"GET /msgs HTTP/1.1\r\nHost: soak\r\nX-Pad: " + b"a" * OVERSIZED_HEAD + b"\r\n\r\n")
            elif kind == "slow_head":
                for byte in b"GET /msgs HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"s" * 64:
                    sock.sendall(bytes([byte]))
                    if self.wait_readable(sock, 1.0):
                        break
            # idle: sends nothing. Each waits for the server to close it (an answer, then EOF).
            deadline = time.monotonic() + HOSTILE_CAP
            while time.monotonic() < deadline and sock.recv(65536):
                pass
            self.counters.add("hostile_%s_closed_by_server" % kind)
        except socket.timeout:
            self.counters.add("hostile_%s_not_closed" % kind)
        except OSError:
            self.counters.add("hostile_%s_reset" % kind)
        finally:
            self.close(sock)

    @staticmethod
    def wait_readable(sock, seconds):
        from gevent.select import select
        readable, _w, _x = select([sock], [], [], seconds)
        return bool(readable)

    def hostiles(self):
        interval = 1.0 / self.args.hostile_per_second
        kinds = ("idle", "slow_head", "oversized_head")
        due = time.monotonic()
        number = 0
        while not self.stopping:
            due += interval
            gevent.sleep(max(0.0, due - time.monotonic()))
            self.spawn(self.hostile, kinds[number % len(kinds)])
            number += 1

    # -- churn ---------------------------------------------------------------------------
    def churn(self):
        """Every second: leave the rooms whose time is up, and replace --churn of the
        listeners per minute by new ones."""
        owed = 0.0
        per_second = self.args.listeners * self.args.churn / 60.0
        while not self.stopping:
            gevent.sleep(1.0)
            self.roll_rooms()
            owed += per_second
            while owed >= 1 and self.listeners:
                owed -= 1
                self.leave(self.random.choice(list(self.listeners)))
                self.join()
            for _ in range(self.args.listeners - len(self.listeners)):
                self.join()  # a listener that ended on an error is replaced too

    # -- figures -------------------------------------------------------------------------
    def status(self):
        gc.collect()  # a greenlet that ended and awaits the collector is no leak
        # gevent's Greenlets: every client is one. Raw greenlets also include the main
        # greenlet of each thread of gevent's resolver pool, which grows and shrinks.
        greenlets = sum(1 for obj in gc.get_objects() if isinstance(obj, gevent.Greenlet))
        # from here to the dict, nothing yields: the counts agree with each other
        descriptors = len(os.listdir("/proc/self/fd")) - 1
        return {
            "pid": os.getpid(), "time": time.time(), "elapsed": time.monotonic() - self.started,
            "stopping": self.stopping,
            "sockets": len(self.sockets), "descriptors": descriptors,
            "descriptors_beyond_sockets": descriptors - len(self.sockets),
            "clients": len(self.clients), "greenlets": greenlets,
            "greenlets_beyond_clients": greenlets - len(self.clients),
            "listeners": len(self.listeners), "live_rooms": len(self.live_rooms()),
            "counters": dict(self.counters),
        }

    def write_status(self):
        path = self.args.status
        with open(path + ".tmp", "w") as out:
            json.dump(self.status(), out)
        os.replace(path + ".tmp", path)

    def run(self):
        for number in range(self.args.short_rooms):
            # the first ones end one after another, so that rooms are left at a steady rate
            self.new_short_room(self.args.room_life * (number + 1) / self.args.short_rooms)
        for number in range(self.args.listeners):
            self.join()
            if number % 50 == 49:
                gevent.sleep(0.05)  # the first wave, spread over a moment
        self.spawn(self.post)
        if self.args.hostile_per_second > 0:
            self.spawn(self.hostiles)
        churn = self.spawn(self.churn)
        end = self.started + self.args.duration
        while time.monotonic() < end:
            self.write_status()
            gevent.sleep(min(self.args.status_every, max(0.0, end - time.monotonic())))
        self.stopping = True
        churn.kill()
        gevent.killall(list(self.clients), timeout=HOSTILE_CAP + 5)
        gevent.sleep(0.1)
        self.write_status()
        for sock in list(self.sockets):
            self.close(sock)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--duration", type=float, required=True, help="seconds of load")
    parser.add_argument("--status", required=True, help="file its figures are written to")
    parser.add_argument("--listeners", type=int, default=1000)
    parser.add_argument("--churn", type=float, default=0.10, help="share of listeners replaced per minute")
    parser.add_argument("--long-rooms", type=int, default=10)
    parser.add_argument("--short-rooms", type=int, default=10)
    parser.add_argument("--room-life", type=float, default=60.0, help="seconds a short-lived room is used")
    parser.add_argument("--posts-per-second", type=float, default=10.0)
    parser.add_argument("--hostile-per-second", type=float, default=1.0)
    parser.add_argument("--status-every", type=float, default=2.0)
    parser.add_argument("--poll-timeout", type=int, default=20, help="the timeout most listeners ask")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    raise_descriptor_limit()
    Driver(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
