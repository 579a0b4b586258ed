#!/usr/bin/env python3
"""Chattle: a Bottle + gevent long-poll chat server.

Every waiting client is a greenlet parked on a gevent Event of its room; a post sets
them, waking every held poll at once (the "Event-based broadcast path"), and later polls
park on fresh ones. The contract with every client is the wire protocol described in
docs/protocol.md (version 1).

    python chattle.py [--port 8080]                                  # one process
    gunicorn chattle                        # gunicorn.conf.py: chattle's gevent worker
    gunicorn --bind 0.0.0.0:8080 --worker-class gevent --workers 1 chattle   # also works
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (everything below must see the patched stdlib)
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from binascii import crc_hqx  # noqa: E402  (Redis Cluster's key hash, CRC16/XMODEM)
from collections import OrderedDict, deque  # noqa: E402

import gevent  # noqa: E402

# Each spawned greenlet would record its spawner and the spawning stack, for debugging
# tools; every held poll is a greenlet, so that record was kept once per waiter.
gevent.config.track_greenlet_tree = False
import bottle  # noqa: E402
from bottle import Bottle, HTTPResponse, request, response, static_file, template  # noqa: E402
from gevent.event import AsyncResult, Event  # noqa: E402
from greenlet import getcurrent  # noqa: E402

import chattle_http  # noqa: E402
from chattle_limits import POLL_TIMEOUT_MAX, collect_garbage_seldom, raise_descriptor_limit  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC_ROOT = os.path.join(HERE, "static")
VIEWS_ROOT = os.path.join(HERE, "views")

PROTOCOL_VERSION = 1

###############################################################################
# Settings: argparse flags for `python chattle.py`, CHATTLE_* variables for gunicorn
###############################################################################

ROOM_PATTERN = r"[A-Za-z0-9_-]{1,64}"
MAX_BODY_BYTES = 16 * 1024
MAX_FROM_CHARS = 40
MAX_CONTENT_CHARS = 2000
MAX_POLL_TIMEOUT = POLL_TIMEOUT_MAX  # what every client's timeout nests around: chattle_limits.py
MAX_LIMIT = 1000
DEFAULT_LIMIT_SINCE = 100
DEFAULT_LIMIT_RECENT = 50
BODY_READ_TIMEOUT = 10.0  # a client that promises a body and stalls must not hold a greenlet

# (flag, environment variable, type, default, help)
SETTINGS = [
    ("host", "CHATTLE_HOST", str, "127.0.0.1", "address to listen on"),
    ("port", "CHATTLE_PORT", int, 8080, "TCP port to listen on"),
    ("history", "CHATTLE_HISTORY", int, 500, "messages retained per room; older ones count as 'missed'"),
    ("poll_timeout", "CHATTLE_POLL_TIMEOUT", float, 25.0,
     "seconds a poll is held when the client gives no 'timeout' (0 to 60)"),
    ("redis", "CHATTLE_REDIS_URL", str, "",
     "share one history between workers and hosts through Redis, e.g. redis://127.0.0.1:6379/0; "
     "empty keeps the in-memory bus"),
    ("redis_cluster", "CHATTLE_REDIS_CLUSTER", str, "",
     "share one history through a Redis Cluster instead, given by one or more of its nodes, "
     "host:port[,host:port]; each room lives on one master (docs/cluster.md)"),
    ("redis_wait", "CHATTLE_REDIS_WAIT", int, 1000,
     "with --redis-cluster: milliseconds a post waits for a replica to have it (WAIT 1 <ms>) before "
     "its 201, so that it survives a failover; not confirmed in time: 503; 0 answers at once, and a "
     "failover may then lose acknowledged posts and give their ids again (docs/cluster.md)"),
    ("idempotency_seconds", "CHATTLE_IDEMPOTENCY_SECONDS", int, 300,
     "seconds a post's Idempotency-Key is remembered: the same key to the same room within them "
     "is answered as the first post was, and not posted again"),
    ("idempotency_keys", "CHATTLE_IDEMPOTENCY_KEYS", int, 10000,
     "Idempotency-Keys the in-memory bus remembers per worker; beyond, the oldest are forgotten "
     "(the shared bus keeps each in Redis for --idempotency-seconds)"),
    ("stop_timeout", "CHATTLE_STOP_TIMEOUT", float, 5.0,
     "seconds a stopping `python chattle.py` lets requests inside the shared bus (a post Redis has "
     "not answered yet) finish before it closes the bus; gunicorn waits its graceful_timeout instead"),
    ("access_log", "CHATTLE_ACCESS_LOG", int, 0,
     "1 logs every request (costly with thousands of held polls)"),
    ("max_retained_bytes", "CHATTLE_MAX_RETAINED_BYTES", int, 256 * 1024 * 1024,
     "bytes of messages a worker retains over all its rooms; beyond, the least recently "
     "active rooms are forgotten (their clients are told 'reset' or 'missed')"),
    ("room_cache_bytes", "CHATTLE_ROOM_CACHE_BYTES", int, 1024 * 1024,
     "bytes of encoded poll answers a room keeps for its fan-outs to share"),
    ("answer_cache_bytes", "CHATTLE_ANSWER_CACHE_BYTES", int, 64 * 1024 * 1024,
     "bytes of encoded poll answers a worker keeps over all its rooms"),
    ("room_ttl", "CHATTLE_ROOM_TTL", int, 7 * 24 * 3600,
     "seconds the shared bus keeps a room nobody posts to (every post starts it again)"),
    ("max_polls_per_address", "CHATTLE_MAX_POLLS_PER_ADDRESS", int, 1024 * 1024,
     "polls a worker holds at once for one client address (REMOTE_ADDR: behind a proxy, the "
     "proxy's); more: 429. The default is above any worker's open-file limit"),
    ("max_answer_bytes", "CHATTLE_MAX_ANSWER_BYTES", int, 256 * 1024,
     "bytes of messages one poll answer carries (always at least one message): a poll past it "
     "gets fewer than its 'limit', and the rest on its next poll"),
    ("max_rooms", "CHATTLE_MAX_ROOMS", int, 100000,
     "rooms a worker holds; beyond, the least recently active idle rooms are forgotten, and a new "
     "room is refused (503) only while every room is in use"),
    ("max_bus_rooms", "CHATTLE_MAX_BUS_ROOMS", int, 1000000,
     "rooms the shared Redis holds (each posted to within --room-ttl); a post that would make one "
     "more is refused (503); on a Redis Cluster the bound is per slot, this over 16384"),
] + chattle_http.LIMIT_SETTINGS


class Settings:
    def __init__(self, **values):
        for name, _env, kind, default, _help in SETTINGS:
            setattr(self, name, kind(values.get(name, default)))
        if not 1 <= self.history:
            raise SystemExit("chattle: --history must be at least 1")
        if not 0 <= self.poll_timeout <= MAX_POLL_TIMEOUT:
            raise SystemExit("chattle: --poll-timeout must be between 0 and %g seconds" % MAX_POLL_TIMEOUT)
        for name in ("max_retained_bytes", "room_cache_bytes", "answer_cache_bytes", "room_ttl",
                     "max_polls_per_address", "max_answer_bytes", "max_rooms", "max_bus_rooms"):
            if getattr(self, name) < 1:
                raise SystemExit("chattle: --%s must be at least 1" % name.replace("_", "-"))
        if self.redis and self.redis_cluster:
            raise SystemExit("chattle: give either --redis or --redis-cluster, not both")
        if self.redis_wait < 0:
            raise SystemExit("chattle: --redis-wait must be 0 (answer at once) or more milliseconds")
        if self.idempotency_seconds < 1 or self.idempotency_keys < 1:
            raise SystemExit("chattle: --idempotency-seconds and --idempotency-keys must be at least 1")
        if not 0 <= self.stop_timeout <= 3600:
            raise SystemExit("chattle: --stop-timeout must be 0 (close the bus at once) to 3600 seconds")
        self.http_limits()  # checks them

    def http_limits(self):
        return chattle_http.HttpLimits(**{name: getattr(self, name) for name, *_rest in chattle_http.LIMIT_SETTINGS})

    @classmethod
    def from_environ(cls, environ=os.environ):
        return cls(**chattle_http.values_from_environ(SETTINGS, environ))


def parse_args(argv=None):
    defaults = Settings.from_environ()
    parser = argparse.ArgumentParser(
        description="Chattle long-poll chat server (gevent pywsgi). "
        "Every flag can also be set with the CHATTLE_* variable named in its help.")
    for name, env, kind, _default, help_text in SETTINGS:
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name),
                            help="%s (env %s, default %%(default)s)" % (help_text, env))
    return Settings(**vars(parser.parse_args(argv)))


###############################################################################
# JSON answers and errors
###############################################################################

JSON_TYPE = "application/json; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"


def encode(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_error(status, message, **headers):
    """An HTTPResponse to raise: every error the protocol names is a JSON object."""
    headers["Content-Type"] = JSON_TYPE
    return HTTPResponse(encode({"error": message}), status, headers)


###############################################################################
# Rooms: a bounded history and the Events its held polls wait on
###############################################################################

class Wakeup:
    """What the polls held on one room park on until its next post: one Event per
    deadline tick, set by the post or, when no post comes first, by that tick's timer.

    Polls whose timeouts end in the same tick share one Event and one timer. A
    timeout per poll (gevent.Timeout in Event.wait) gave every held poll a timer of
    its own, started when it parked and stopped when it woke, and about 0.4 KB;
    a post now stops one timer per tick. A tick's timer fires at or after the tick,
    so a poll is never answered before its timeout, and normally within one tick after it.
    """

    __slots__ = ("by_tick",)

    TICK = 0.05  # seconds

    def __init__(self):
        self.by_tick = {}  # tick number -> (Event, its timer)

    def event_until(self, deadline):
        """The Event to park on for a poll that must be answered by `deadline` (monotonic)."""
        tick = math.ceil(deadline / self.TICK)
        entry = self.by_tick.get(tick)
        if entry is None:
            event = Event()
            timer = gevent.get_hub().loop.timer(max(0.0, tick * self.TICK - time.monotonic()))
            timer.start(self._expire, tick, event)
            entry = self.by_tick[tick] = (event, timer)
        return entry[0]

    def _expire(self, tick, event):
        if self.by_tick.get(tick, (None,))[0] is event:
            del self.by_tick[tick]
        event.set()

    def set(self):
        """Wake every poll parked now. Polls that park after this get fresh Events, so a
        woken poll never finds a set Event to spin on."""
        by_tick, self.by_tick = self.by_tick, {}
        for event, timer in by_tick.values():
            timer.close()
            event.set()


# What Room.wait_for_news returns when the client of the poll left while it was held.
CLIENT_LEFT = object()


class Room:
    """One room's retained messages, and the two verbs: add a message, wait for one.

    Each message is kept as (id, its JSON encoding), encoded once when it arrives,
    so a fan-out to N waiters on one cursor joins the fragments once and sends the
    same bytes N times.
    """

    __slots__ = ("name", "messages", "last_id", "epoch", "restarts", "waiting", "_wakeup", "_answers",
                 "_name_json", "registry", "retained_bytes", "cached_bytes")

    ANSWER_CACHE_SIZE = 64
    # A message's cost beyond its encoding: its (id, fragment) tuple, the id, the bytes
    # object's header and its slot in the deque.
    MESSAGE_OVERHEAD = 120
    RESET = -1  # the `since` of an answer that tells its client "reset"
    # An answer to a cursor this close to the newest message is worth keeping even when
    # the poll was not held: the clients a burst of posts left one step behind ask it.
    SHARED_CATCH_UP = 8

    def __init__(self, name, history, registry):
        self.name = name
        self.messages = deque(maxlen=history)
        self.last_id = 0
        # The token of the history the ids belong to: a history that starts again (its ids
        # from 1) gets a new one, so a cursor of the old one is told "reset", never given a
        # reused id as news. None until the first post of a history names it.
        self.epoch = None
        self.restarts = 0  # times the history started again here: what a held poll watches
        self.waiting = 0  # polls held on this room now
        self._wakeup = Wakeup()
        self._answers = {}
        self._name_json = encode(name)
        self.registry = registry
        self.retained_bytes = 0  # what its messages cost, counted against the worker's bound
        self.cached_bytes = 0    # what its cached answers hold, counted against both cache bounds

    # -- verb 1 ---------------------------------------------------------------
    def add(self, message_id, fragment):
        """Retain a message and wake every poll held on this room.

        A waiter that checks `last_id` and then parks cannot miss a post, since
        nothing yields between its check and its park.
        """
        if message_id <= self.last_id:
            return  # the bus may deliver an entry a poll already fetched from it
        messages = self.messages
        if len(messages) == messages.maxlen:
            self._count_retained(-len(messages[0][1]) - self.MESSAGE_OVERHEAD)
        messages.append((message_id, fragment))
        self.last_id = message_id
        self.registry.drop_answers(self)
        self._count_retained(len(fragment) + self.MESSAGE_OVERHEAD)
        self._wakeup.set()

    def _count_retained(self, change):
        self.retained_bytes += change
        self.registry.count_retained(self, change)

    # -- verb 2 ---------------------------------------------------------------
    def holds(self, since, timeout, epoch=None):
        """Whether wait_for_news(since, timeout, epoch) would hold the poll, asked just before it."""
        return self.last_id == since and timeout > 0 and not self.stale(epoch)

    def wait_for_news(self, since, timeout, epoch=None, peer=None):
        """Hold the calling greenlet until a message after `since` exists, the history
        starts again, or timeout. True when it was held: its answer is then one a fan-out
        shares. CLIENT_LEFT when the client of `peer`, the poll's connection, closed or
        reset it meanwhile."""
        if self.last_id != since or timeout <= 0 or self.stale(epoch):
            return False  # news already, or a cursor from the future or another history: "reset" answers at once
        deadline = time.monotonic() + timeout
        registry = self.registry
        registry.waiters += 1
        self.waiting += 1
        resume = getcurrent().switch
        restarts = self.restarts
        watcher = None if peer is None else chattle_http.watch_peer(peer, resume)
        try:
            while self.last_id <= since and self.restarts == restarts and not registry.closing:
                if time.monotonic() >= deadline:
                    break
                # Park until the Event is set: Event.wait without a timeout and with fewer
                # levels of C stack, which every held poll keeps while it waits; inline, as
                # every Python frame on a held poll's stack is one more frame object that
                # greenlet makes for it on Python 3.12 and later (about 220 bytes).
                event = self._wakeup.event_until(deadline)
                event.rawlink(resume)
                try:
                    woken_by = gevent.get_hub().switch()
                except BaseException:
                    event.unlink(resume)
                    raise
                if woken_by is not event:
                    event.unlink(resume)
                    # Woken by the socket's watcher (STIRRED), the one other waker: the
                    # client left, or sent bytes early (held on). Not told apart by the
                    # value, so that no wake-up leaves a stirred watcher to fire again.
                    if watcher is not None and chattle_http.peer_gone(peer, watcher):
                        return CLIENT_LEFT
        finally:
            if watcher is not None:
                watcher.stop()
            registry.waiters -= 1
            self.waiting -= 1
        return True

    def wake_all(self):
        self._wakeup.set()

    def drop_oldest(self):
        """Forget the oldest retained message (its id is not reused: a poll after it is
        told "missed")."""
        _id, fragment = self.messages.popleft()
        self.registry.drop_answers(self)
        self._count_retained(-len(fragment) - self.MESSAGE_OVERHEAD)

    def drop_messages(self):
        """Forget every retained message, keeping `last_id`."""
        self.messages.clear()
        self.registry.drop_answers(self)
        self._count_retained(-self.retained_bytes)

    def start_again(self, epoch=None):
        """The history starts over (the shared bus lost it, or gave its ids again): drop
        every message and wake every held poll, which is told "reset" with the new epoch;
        ids go on from 0 here, as the shared bus has them."""
        self.drop_messages()
        self.last_id = 0
        self.epoch = epoch
        self.restarts += 1
        self._wakeup.set()

    def stale(self, epoch):
        """A cursor of `epoch` belongs to a history this room no longer holds."""
        return epoch is not None and epoch != self.epoch

    # -- answers ----------------------------------------------------------------
    def answer(self, since, limit, shared=False, epoch=None):
        """The encoded poll answer for `since` (None: the newest) of the history `epoch`
        (None: the current one) as the room is now.

        Kept for others to share when a fan-out shares it (`shared`: the poll was held,
        so every poll woken with it asks the same), or when it is the newest messages
        or a cursor just behind them; a catch-up read from an older cursor is made for
        its one client and not kept. What is kept is bounded in bytes per room and per
        worker (Rooms.keep_answer)."""
        if since is not None and (since > self.last_id or self.stale(epoch)):
            since = self.RESET  # one answer for every cursor the room cannot continue
        key = (since, limit)
        body = self._answers.get(key)
        if body is None:
            body = self._encode_answer(since, limit)
            if shared or since is None or since == self.RESET or self.last_id - since <= self.SHARED_CATCH_UP:
                self.registry.keep_answer(self, key, body)
        return body

    def _encode_answer(self, since, limit):
        self.registry.encodes += 1
        messages = self.messages
        reset = since == self.RESET
        missed = 0
        if since is None or reset:
            chosen = list(messages)[-limit:] if limit < len(messages) else list(messages)
            cursor = self.last_id
        else:
            first_id = messages[0][0] if messages else self.last_id + 1
            missed = max(0, first_id - 1 - since)
            start = since + 1 + missed - first_id  # index of the first message to send
            chosen = [messages[i] for i in range(start, min(start + limit, len(messages)))]
            cursor = chosen[-1][0] if chosen else since
        if len(chosen) > 1 and self.registry.max_answer_bytes is not None:
            chosen, cursor = self._within_budget(chosen, cursor, newest=since is None or reset)
        parts = [b'{"room":', self._name_json, b',"messages":[',
                 b",".join(fragment for _id, fragment in chosen),
                 b'],"cursor":%d,"missed":%d,"epoch":' % (cursor, missed),
                 b"null" if self.epoch is None else encode(self.epoch)]
        if reset:
            parts.append(b',"reset":true')
        parts.append(b"}")
        return b"".join(parts)

    def _within_budget(self, chosen, cursor, newest):
        """The messages of `chosen` an answer carries within the worker's byte budget (at
        least one, so every client progresses), and its cursor. Catching up, the oldest go
        first and the cursor is the last sent: the next poll asks for the rest. Asked for
        the newest, the newest go and the cursor stays: the older ones are not news.
        Unbounded, one answer reached 1000 messages of 8 KB, 8 MB encoded again per request
        and held whole by each client that did not read it."""
        budget = self.registry.max_answer_bytes
        if sum(len(fragment) + 1 for _id, fragment in chosen) <= budget:
            return chosen, cursor
        taken = 0
        for _id, fragment in reversed(chosen) if newest else chosen:
            budget -= len(fragment) + 1  # and its comma
            if budget < 0:
                break
            taken += 1
        taken = max(1, taken)
        if newest:
            return chosen[-taken:], cursor
        return chosen[:taken], chosen[taken - 1][0]


class Rooms:
    """Every room this worker knows, created on first use, and the worker's counters and
    bounds: the bytes of messages it retains, and of answers it caches.

    `by_name` is kept in order of activity (a post, or a poll), least recent first: when
    the retained messages outgrow `max_retained_bytes`, the least recently active rooms
    nobody waits on are forgotten first. With the in-memory bus a forgotten room starts
    again from nothing, so a client that comes back with its cursor is told "reset"; with
    the shared bus the room is loaded again from Redis, where ids go on."""

    def __init__(self, history, max_retained_bytes=None, room_cache_bytes=1024 * 1024,
                 answer_cache_bytes=64 * 1024 * 1024, max_polls_per_address=None, max_answer_bytes=None,
                 max_rooms=None):
        self.history = history
        self.max_answer_bytes = max_answer_bytes
        self.max_rooms = max_rooms
        self.full_until = 0.0  # while every room was in use at the bound, new ones are refused
        self.by_name = OrderedDict()
        self.waiters = 0      # polls held right now
        self.encodes = 0      # poll answers encoded (a fan-out on one cursor costs one)
        self.forgotten = 0    # rooms with a history forgotten at a bound (retained bytes, max_rooms)
        self.closing = False  # set on shutdown: held polls answer at once
        self.max_retained_bytes = max_retained_bytes
        self.retained_bytes = 0
        self.room_cache_bytes = room_cache_bytes
        self.answer_cache_bytes = answer_cache_bytes
        self.cached_bytes = 0
        self.caching = OrderedDict()  # rooms with cached answers, least recently cached first
        self.on_forget = None  # called with a room's name when it is forgotten (the bus's copy)
        self.max_polls_per_address = max_polls_per_address  # None: no bound
        self.polls_by_address = {}  # client address -> polls held for it now; none at 0

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.history, settings.max_retained_bytes, settings.room_cache_bytes,
                   settings.answer_cache_bytes, settings.max_polls_per_address, settings.max_answer_bytes,
                   settings.max_rooms)

    def get(self, name):
        room = self.by_name.get(name)
        if room is None:
            if self.max_rooms is not None and len(self.by_name) >= self.max_rooms:
                self._shed_rooms()
            room = self.by_name[name] = Room(name, self.history, self)
            self.count_retained(room, self.room_cost(name))
        else:
            self.by_name.move_to_end(name)
        return room

    def release(self, room):
        """Forget a room nobody posted to and nobody waits on: polling made-up room
        names must not grow the worker's memory. True when it was dropped."""
        if room.last_id or room.waiting or self.by_name.get(room.name) is not room:
            return False
        self.drop_answers(room)
        del self.by_name[room.name]
        self.retained_bytes -= self.room_cost(room.name)
        return True

    def retained(self):
        return sum(len(room.messages) for room in self.by_name.values())

    # -- held polls per client address --------------------------------------------
    def hold_poll(self, address):
        """Count one more poll held for `address`; False, counting nothing, at the bound.
        Only addresses with a poll held have an entry, so the table is never larger than
        the polls held."""
        held = self.polls_by_address.get(address, 0)
        if self.max_polls_per_address is not None and held >= self.max_polls_per_address:
            return False
        self.polls_by_address[address] = held + 1
        return True

    def end_poll(self, address):
        held = self.polls_by_address.pop(address) - 1
        if held:
            self.polls_by_address[address] = held

    # -- the retained history's bound -----------------------------------------------
    def count_retained(self, room, change):
        if self.by_name.get(room.name) is not room:
            return  # forgotten while a fetch still filled it: its bytes are nobody's (and go with it)
        self.retained_bytes += change
        if change > 0 and self.max_retained_bytes is not None and self.retained_bytes > self.max_retained_bytes:
            self._shed(room)

    SHED_TO = 0.9  # of the bound: shedding a little more than needed makes it rare

    def _shed(self, growing):
        """Back under the bound: forget whole rooms, least recently active first, that
        nobody waits on (and not `growing`, which just took a message; nor a new empty
        one, which may be loading; one this trimmed empty while a poll waited there goes
        too, or it would stay for good); if that is not enough, the oldest messages of the rest."""
        target = self.max_retained_bytes * self.SHED_TO
        for room in list(self.by_name.values()):
            if self.retained_bytes <= target:
                return
            if room is growing or room.waiting or not (room.messages or room.last_id):
                continue
            self._drop_room(room)
        for room in list(self.by_name.values()) + [growing]:
            while self.retained_bytes > target and len(room.messages) > (room is growing):
                room.drop_oldest()

    def _drop_room(self, room):
        self.forgotten += 1
        room.drop_messages()
        del self.by_name[room.name]
        self.retained_bytes -= self.room_cost(room.name)
        if self.on_forget is not None:
            self.on_forget(room.name)

    # -- the rooms' bound ---------------------------------------------------------------
    # What a room costs beyond its messages: the Room, its deque, Wakeup and dicts, its epoch,
    # its slot in by_name, and its name twice (the str, and its JSON encoding): 1,255 bytes
    # plus twice the name's length, as tracemalloc counts 1,000 rooms of one message each
    # made by MemoryBus.publish, less their messages' own cost (tests/test_bounds.py measures
    # it again). Counted in retained_bytes, so the worker's bound is in real bytes.
    ROOM_OVERHEAD = 1255

    @classmethod
    def room_cost(cls, name):
        return cls.ROOM_OVERHEAD + 2 * len(name)

    FULL_BACKOFF = 1.0  # seconds new rooms are refused once no room could be forgotten

    def _shed_rooms(self):
        """Room for one more under max_rooms: forget the least recently active rooms that
        are idle (nobody waits on them; not a new empty one, which may be loading), down to
        SHED_TO of the bound, so a scan is rare. With none idle, refuse: RoomsFull. A scan
        that found none is not made again for FULL_BACKOFF, so refused requests stay cheap."""
        if time.monotonic() >= self.full_until:
            target = int(self.max_rooms * self.SHED_TO)
            for room in list(self.by_name.values()):
                if len(self.by_name) <= target:
                    break
                if room.waiting or not (room.messages or room.last_id):
                    continue
                self._drop_room(room)
            if len(self.by_name) < self.max_rooms:
                return
            self.full_until = time.monotonic() + self.FULL_BACKOFF
        raise RoomsFull("this worker holds its maximum of %d rooms, and polls wait on every one: "
                        "retry later, or use a room that exists" % self.max_rooms)

    # -- the answer cache's bounds ----------------------------------------------------
    def keep_answer(self, room, key, body):
        size = len(body)
        if size > self.room_cache_bytes:
            return
        if room.cached_bytes + size > self.room_cache_bytes or len(room._answers) >= room.ANSWER_CACHE_SIZE:
            self.drop_answers(room)
        while self.cached_bytes + size > self.answer_cache_bytes and self.caching:
            self.drop_answers(next(iter(self.caching)))
        room._answers[key] = body
        room.cached_bytes += size
        self.cached_bytes += size
        self.caching[room] = None
        self.caching.move_to_end(room)

    def drop_answers(self, room):
        if room.cached_bytes:
            self.cached_bytes -= room.cached_bytes
            room.cached_bytes = 0
            del self.caching[room]
        room._answers.clear()

    def close(self):
        """Answer every held poll now, so a graceful stop is not held up by long-polls."""
        self.closing = True
        for room in list(self.by_name.values()):
            room.wake_all()


###############################################################################
# Buses: how a post reaches every worker's rooms
###############################################################################

def bus_log(message):
    """One line (or a traceback) on the server's log, stderr."""
    print("chattle: " + message, file=sys.stderr, flush=True)


class BusUnavailable(Exception):
    """The shared bus cannot be reached; nothing was written (unless `maybe_written`: the
    post's outcome is unknown, as it was sent and no answer came, or it was written but
    not confirmed as asked)."""

    def __init__(self, reason, maybe_written=False):
        super().__init__(reason)
        self.maybe_written = maybe_written


def never_sent(redis, exc, one_command=True):
    """Whether redis-py raised `exc` where the command certainly never ran: Redis refused it,
    or it never reached Redis whole (no free connection, none made, or its write failed:
    Redis runs only a whole command, but a pipeline's first command may be whole when the
    write of a later one fails, so `one_command` False). Anything else, a reply that timed
    out or a connection lost while waiting for it above all, may come after Redis ran it.
    Told by redis-py's messages: one it words otherwise counts as unknown, never as unsent."""
    if isinstance(exc, (redis.exceptions.ResponseError, redis.exceptions.MaxConnectionsError)):
        return True
    text = str(exc)
    return (text.startswith("No connection available") or " connecting to " in text
            or text == "Timeout connecting to server" or (one_command and "writing to socket" in text))


_epochs_made = itertools.count()


def new_epoch():
    """A token no earlier history of a room in any process is likely to have had: this
    process's clock in microseconds, its pid and a count, in hex of a fixed width (20
    characters, so every answer of a room has one length). A room forgotten here and
    posted to again, or a server started again, begins a history of a new epoch."""
    return "%013x%04x%03x" % (time.time_ns() // 1000, os.getpid() & 0xFFFF, next(_epochs_made) & 0xFFF)


class RoomsFull(Exception):
    """A new room refused: the bound on rooms is reached and none can be forgotten. Answered
    503 with Retry-After, as the protocol answers a post that was not accepted."""

    def __init__(self, message, retry_after=1):
        super().__init__(message + "; nothing was written")
        self.retry_after = retry_after


class MemoryBus:
    """One process, no setup: the post is the wake-up."""

    name = "memory"
    posts_received = posts_received_for_rooms_not_held = 0  # no reader: the post is the wake-up

    def __init__(self, rooms, idempotency_seconds=300, idempotency_keys=10000):
        self.rooms = rooms
        self.idempotency_seconds = idempotency_seconds
        self.idempotency_keys = idempotency_keys
        # (room, Idempotency-Key) -> (id, ts, epoch, when it lapses on the monotonic clock), oldest
        # first: every entry lives the same window, so the oldest is also the first to lapse.
        self.posted_by_key = OrderedDict()

    def publish(self, room_name, sender, content, idempotency_key=None):
        if idempotency_key is not None:
            posted = self._posted_before(room_name, idempotency_key)
            if posted is not None:
                return posted
        room = self.rooms.get(room_name)
        if room.epoch is None:
            room.epoch = new_epoch()
        message = {"id": room.last_id + 1, "from": sender, "content": content, "ts": time.time()}
        room.add(message["id"], encode(message))
        message["epoch"] = room.epoch
        if idempotency_key is not None:
            self.posted_by_key[room_name, idempotency_key] = (
                message["id"], message["ts"], message["epoch"], time.monotonic() + self.idempotency_seconds)
        return message

    def _posted_before(self, room_name, idempotency_key):
        """The first post under this key, while remembered; drops what lapsed or is over the bound."""
        table, now = self.posted_by_key, time.monotonic()
        while table and (len(table) >= self.idempotency_keys or next(iter(table.values()))[3] <= now):
            table.popitem(last=False)
        posted = table.get((room_name, idempotency_key))
        if posted is None:
            return None
        return {"id": posted[0], "ts": posted[1], "epoch": posted[2], "replayed": True}

    def room(self, room_name, since=None, epoch=None):
        """The room a poll after `since` of history `epoch` is answered from (the shared bus
        may load it first)."""
        return self.rooms.get(room_name)

    def forget(self, room_name):
        pass

    def health(self):
        """(ok, why not): what /health answers."""
        return True, None

    def healthy(self):
        return self.health()[0]

    def reader_state(self):
        return None  # no reader

    def clock(self):
        """The clock every `ts` of this bus is read from."""
        return time.time()

    def close(self):
        pass


# The part of both buses' post scripts that names the room's history (its epoch). A history
# starts at id 1: a Redis that lost the room (a restart without persistence, an eviction,
# the room's TTL) starts it again there, and a new epoch says so to every worker and client.
# The epoch is Redis' clock at that start in microseconds, in hex. An id 1 drops what is
# left of an older stream (its ids would refuse the new ones); an epoch key lost on its own
# starts a new epoch too, so clients are told "reset" rather than assumed to be current.
# The uses of `id`, `now`, EPOCH_KEY and STREAM_KEY are the caller's.
EPOCH_LUA = """
local epoch = redis.call('GET', EPOCH_KEY)
if id == 1 or not epoch then
  if id == 1 then redis.call('DEL', STREAM_KEY) end
  epoch = string.format('%x', tonumber(now[1]) * 1000000 + tonumber(now[2]))
  redis.call('SET', EPOCH_KEY, epoch)
end
"""

# The rooms' bound in Redis, the first block of each bus's post script, before anything is
# written. A sorted set holds every room by the second of its last post; a room not in it
# (nor with a last id of its own: a room from before the set) is a new one, refused when
# the set, trimmed first of the rooms whose keys have expired, is at the bound. Refused, the
# script answers {-1, seconds until the least recently posted room expires}. A post to a
# room in the set costs three commands more (TIME, ZSCORE, ZADD); a new room, three more.
ROOMS_BOUND_SCRIPT = """
local rooms_now = tonumber(redis.call('TIME')[1])
if not redis.call('ZSCORE', %(rooms)s, ARGV[1]) and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREMRANGEBYSCORE', %(rooms)s, '-inf', '(' .. (rooms_now - tonumber(%(ttl)s)))
  if redis.call('ZCARD', %(rooms)s) >= tonumber(%(bound)s) then
    local oldest = redis.call('ZRANGE', %(rooms)s, 0, 0, 'WITHSCORES')
    return {-1, tonumber(oldest[2] or rooms_now) + tonumber(%(ttl)s) - rooms_now + 1}
  end
end
redis.call('ZADD', %(rooms)s, rooms_now, ARGV[1])
-- end of the rooms' bound
"""


class RedisBus:
    """Many workers and hosts, one history: Redis Streams hold every room's messages.

    A post runs one Lua script that takes the room's next id (INCR) and appends the
    message under that id to the room's stream and to the global stream
    `chattle:posts`, all or nothing. `ts` comes from Redis' own clock (TIME inside the
    script), so every worker stamps with the same clock. One reader greenlet per worker
    follows `chattle:posts` with a blocking XREAD and adds each message to the rooms
    this worker serves; that add is the local, cheap wake-up. A room is loaded from its
    stream the first time a poll on this worker names it, so the local copy is always
    the room's newest `history` messages, contiguous, exactly as one process would have
    them: `missed` and `reset` are judged as in the in-memory bus.
    """

    LOAD_ATTEMPTS = 3  # a poll that waited for another's load looks again this often at most
    SETTLE_TRIES = 20  # a catch-up tries this often while Redis does not answer (about 15 s)

    name = "redis"
    POSTS = "chattle:posts"
    ROOMS = "chattle:rooms"     # every room Redis holds, by its last post's time (ROOMS_BOUND_SCRIPT)
    POSTS_RETAINED = 10000      # the reader only needs recent entries; a longer outage resyncs rooms
    READ_BLOCK_MS = 5000
    READ_BATCH = 500
    # What the publish scripts write in each entry (room, id, from, content, ts): an entry
    # short of one, or with an id or ts that is not a number, is skipped, never applied.
    ENTRY_FIELDS = ("r", "i", "f", "c", "t")
    ENTRY_ID = re.compile(r"[1-9][0-9]{0,17}")
    ENTRY_TS = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")
    ERROR_CHARS = 200           # of an error or a malformed entry quoted in /stats and the log
    # The reader looks whether it was trimmed past (_trimmed_past) after a full batch (it is
    # behind), and otherwise at most this often: in less time, fewer posts than
    # POSTS_RETAINED can be written (a Redis runs the post script about 50 000 times a
    # second at most), so a reader that was at the stream's end cannot be trimmed past in
    # between, and a busy reader makes at most 10 such round trips a second.
    TRIM_CHECK_EVERY = 0.1
    BACKOFF_FIRST, BACKOFF_MAX = 0.05, 1.0
    POOL_SIZE = 64              # posts and loads share it; a full pool waits, then answers 503
    SOCKET_TIMEOUT = 2.0

    # KEYS: the room's last id, the room's stream, the global stream, the room's epoch, the
    # rooms' set (ROOMS); a post with an Idempotency-Key also its key (IDEMPOTENCY_KEY), and
    # its window in seconds as ARGV[8].
    # ARGV: room, from, content, room stream length, global stream length, the room's TTL,
    # the most rooms Redis holds.
    # The room's keys expire together when nobody posts to it for the TTL (every post
    # starts it again): its life ends, and its ids start again from 1 in the next one.
    # A key already there is the same post sent again: answered with what the first was
    # given (and 'replayed'), and not posted; else it is kept, "<id> <ts> <epoch>", for the window.
    PUBLISH_SCRIPT = """
if KEYS[6] then
  local posted = redis.call('GET', KEYS[6])
  if posted then
    local id, ts, epoch = string.match(posted, '^(%d+) (%S+) (%S+)$')
    return {tonumber(id), ts, epoch, 'replayed'}
  end
end
""" + ROOMS_BOUND_SCRIPT % {"rooms": "KEYS[5]", "ttl": "ARGV[6]", "bound": "ARGV[7]"} + """
local id = redis.call('INCR', KEYS[1])
local now = redis.call('TIME')
local ts = now[1] .. '.' .. string.format('%06d', tonumber(now[2]))
""" + EPOCH_LUA.replace("EPOCH_KEY", "KEYS[4]").replace("STREAM_KEY", "KEYS[2]") + """
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], id .. '-0', 'f', ARGV[2], 'c', ARGV[3], 't', ts)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'r', ARGV[1], 'i', id,
           'f', ARGV[2], 'c', ARGV[3], 't', ts, 'e', epoch)
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('EXPIRE', KEYS[4], ARGV[6])
if KEYS[6] then
  redis.call('SET', KEYS[6], id .. ' ' .. ts .. ' ' .. epoch, 'EX', ARGV[8])
end
return {id, ts, epoch}
"""
    IDEMPOTENCY_KEY = "chattle:room:%s:idem:%s"  # room, Idempotency-Key

    def __init__(self, rooms, url, history, room_ttl=7 * 24 * 3600, idempotency_seconds=300, max_rooms=1000000):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.redis = redis
        self.rooms = rooms
        self.history = history
        self.room_ttl = room_ttl
        self.idempotency_seconds = idempotency_seconds
        self.max_rooms = max_rooms
        rooms.on_forget = self.forget  # a room the worker forgot is loaded again from Redis
        # No retries: a post whose reply was lost must not be written twice.
        no_retry = Retry(NoBackoff(), 0)
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=self.POOL_SIZE, timeout=self.SOCKET_TIMEOUT, decode_responses=True,
            socket_timeout=self.SOCKET_TIMEOUT, socket_connect_timeout=self.SOCKET_TIMEOUT, retry=no_retry)
        self.client = redis.Redis(connection_pool=pool, retry=no_retry)
        self.reader_client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=self.READ_BLOCK_MS / 1000.0 + 5,
            socket_connect_timeout=self.SOCKET_TIMEOUT, retry=no_retry,
            encoding_errors="replace")  # bytes that are not UTF-8 must not fail a whole batch, read after read
        # One connection of its own, as single_connection_client gives, but not connected yet:
        # that option connects in the constructor, so a worker started while Redis was down
        # failed its boot (and gunicorn halted). The reader's first command connects it.
        self.reader_client.connection = self.reader_client.connection_pool.make_connection()
        self.publish_script = self.client.register_script(self.PUBLISH_SCRIPT)
        self.loaded = {}            # room name -> True, or the Event a load in progress sets
        self.held_back = {}         # room name -> reader entries a load or catch-up applies after it
        self.reader_ok = False
        self.seen = None            # the last global stream entry the reader has applied
        self.trim_handled = "0-0"   # the trim mark (_trimmed_past) every room was last fetched again for
        self.reader_status = "starting"
        self.reader_restarts = 0    # unexpected errors the reader started again after
        self.reader_reconnects = 0  # Redis errors it connected again after
        self.malformed_entries = 0  # entries skipped: not as the publish script writes them
        self.resyncs = 0            # times every loaded room was fetched again (a resume, a trim past the reader)
        self.reader_error = None    # the last error the reader met, for /stats and /health
        self.catching_up = {}       # room name -> the AsyncResult of the catch-up under way
        self.posts_received = 0     # posts the reader was given (the reader's cost)
        self.posts_received_for_rooms_not_held = 0  # of those, posts of rooms this worker holds no copy of
        self.closing = False
        self.reader = gevent.spawn(self._follow)

    @staticmethod
    def room_keys(room_name):
        return "chattle:room:%s:last" % room_name, "chattle:room:%s:stream" % room_name

    @staticmethod
    def epoch_key(room_name):
        return "chattle:room:%s:epoch" % room_name

    @staticmethod
    def fragment(message_id, sender, content, ts):
        return encode({"id": message_id, "from": sender, "content": content, "ts": float(ts)})

    # -- posts ---------------------------------------------------------------------
    def publish(self, room_name, sender, content, idempotency_key=None):
        last_key, stream_key = self.room_keys(room_name)
        keys = [last_key, stream_key, self.POSTS, self.epoch_key(room_name), self.ROOMS]
        args = [room_name, sender, content, self.history, self.POSTS_RETAINED, self.room_ttl, self.max_rooms]
        if idempotency_key is not None:
            keys.append(self.IDEMPOTENCY_KEY % (room_name, idempotency_key))
            args.append(self.idempotency_seconds)
        try:
            reply = self.publish_script(keys=keys, args=args)
        except self.redis.RedisError as exc:
            raise BusUnavailable(type(exc).__name__, maybe_written=not never_sent(self.redis, exc))
        if reply[0] == -1:
            raise RoomsFull("the shared bus holds its maximum of %d rooms, each posted to within %d s: "
                            "post to a room that exists, or to a new one once the least recently "
                            "posted expires (Retry-After)" % (self.max_rooms, self.room_ttl), retry_after=reply[1])
        message_id, ts, epoch = reply[0], reply[1], reply[2]
        if reply[-1] == "replayed":  # posted by its first sending: the reader delivers it as it was
            return {"id": int(message_id), "ts": float(ts), "epoch": epoch, "replayed": True}
        return self._posted(room_name, sender, content, int(message_id), ts, epoch)

    def _posted(self, room_name, sender, content, message_id, ts, epoch):
        message = {"id": message_id, "from": sender, "content": content, "ts": float(ts), "epoch": epoch}
        room = self.rooms.by_name.get(room_name)
        # The reader will deliver it too; adding it here now only when it is the very
        # next id of the copy's history keeps the local copy contiguous and wakes this
        # worker's polls sooner.
        if room is not None and self.loaded.get(room_name) is True and self._follows(room, message_id, epoch):
            room.add(message_id, self.fragment(message_id, sender, content, ts))
        return message

    @staticmethod
    def _follows(room, message_id, epoch):
        """The message is the next one of the copy's history, or the first of a history
        where the copy holds none (its epoch is then taken)."""
        if message_id != room.last_id + 1:
            return False
        if epoch == room.epoch:
            return True
        if room.last_id == 0 and room.epoch is None:
            room.epoch = epoch
            return True
        return False

    # -- polls -----------------------------------------------------------------------
    def room(self, room_name, since=None, epoch=None):
        """The room with its local copy current enough to answer a poll after `since` of
        the history `epoch`."""
        for _attempt in range(self.LOAD_ATTEMPTS):
            room = self.rooms.get(room_name)
            state = self.loaded.get(room_name)
            if state is True:
                break
            if state is None:
                self._load(room_name, room)
                break
            # Another poll is loading it. Counted as waiting meanwhile, so that poll, finding
            # the room empty, does not drop it (Rooms.release) under this one; and looking
            # again afterwards, since its load may have failed.
            room.waiting += 1
            try:
                state.wait()
            finally:
                room.waiting -= 1
        else:
            self.rooms.release(room)
            raise BusUnavailable("the room could not be loaded")
        if since is not None and (since > room.last_id or room.stale(epoch)):
            # A cursor another worker handed out before this worker's reader caught up
            # is not from the future, nor from a history gone: ask Redis before answering "reset".
            self._catch_up(room_name, room)
        return room

    def _load(self, room_name, room):
        loading = self.loaded[room_name] = Event()
        try:
            self._sync(room_name, room)
            self.loaded[room_name] = True
        except self.redis.RedisError as exc:
            del self.loaded[room_name]
            self.held_back.pop(room_name, None)  # its next load reads them from its stream
            self.rooms.release(room)  # or each poll naming a new room while Redis is down leaves one
            raise BusUnavailable(type(exc).__name__)
        finally:
            loading.set()
        if room_name in self.held_back:
            gevent.spawn(self._settle, room_name)

    def _catch_up(self, room_name, room):
        """Bring the copy up to Redis for a cursor past it (or of another history). The room
        is fetched only when Redis' last id or epoch differs from the copy's (one MGET first),
        so a cursor from the future, however often it comes, costs Redis no fetch; concurrent
        catch-ups of a room share one. A room left empty by a failed one is let go, as a
        failed load is."""
        pending = self.catching_up.get(room_name)
        if pending is None:
            pending = self.catching_up[room_name] = AsyncResult()
            try:
                last, epoch = self._head(room_name)
                if int(last or 0) != room.last_id or epoch != room.epoch:
                    self._sync(room_name, room)
                pending.set()
            except self.redis.RedisError as exc:
                pending.set_exception(BusUnavailable(type(exc).__name__))
            finally:
                del self.catching_up[room_name]
                if not pending.ready():  # this poll was ended meanwhile: those sharing it ask again
                    pending.set_exception(BusUnavailable("the catch-up was interrupted"))
        else:
            room.waiting += 1  # as for a load: not let go under the polls waiting for it
            try:
                pending.wait()
            finally:
                room.waiting -= 1
        try:
            pending.get(block=False)
        except BusUnavailable:
            if self.rooms.release(room):
                self.forget(room_name)
            raise

    def _head(self, room_name):
        """(the room's last id, its epoch) in Redis."""
        return self.client.mget(self.room_keys(room_name)[0], self.epoch_key(room_name))

    def _sync(self, room_name, room):
        """Bring the local copy up to Redis: the newest `history` messages, contiguous."""
        last, epoch, newest_first = self._fetch(room_name)
        last = int(last or 0)
        if room.last_id == 0 and room.epoch is None:
            room.epoch = epoch  # the copy holds nothing yet: it takes Redis' history as it is
        elif epoch != room.epoch or last < room.last_id or self._diverged(room, newest_first):
            # Redis holds another history than the copy's (it lost the room: a restart
            # without persistence, an eviction, the room's TTL; or a promoted replica lacked
            # posts): start it again, so every held poll and every client holding those
            # ids is told "reset".
            room.start_again(epoch)
        entries = [(int(entry_id.split("-")[0]), fields) for entry_id, fields in reversed(newest_first)]
        entries = [(message_id, fields) for message_id, fields in entries if message_id > room.last_id]
        if entries and entries[0][0] > room.last_id + 1:
            room.drop_messages()  # the copy would have a hole: start it afresh from Redis
        for message_id, fields in entries:
            if self.malformed_message(fields):
                # Not as the post script writes it (anything with access to Redis may XADD
                # there): its id, and all before it, are told as `missed`, never sent as
                # something else, and the copy stays contiguous after it.
                self.malformed_entries += 1
                self.reader_error = ("malformed message %d of room %s" % (message_id, room_name))[:self.ERROR_CHARS]
                room.drop_messages()
                room.last_id = message_id
                continue
            room.add(message_id, self.fragment(message_id, fields["f"], fields["c"], fields["t"]))

    @classmethod
    def malformed_message(cls, fields):
        """True when a room stream's entry lacks what a message needs."""
        return not (isinstance(fields, dict) and all(isinstance(fields.get(name), str) for name in "fct")
                    and cls.ENTRY_TS.fullmatch(fields["t"]))

    def _fetch(self, room_name):
        """(the room's last id, its epoch, its newest `history` stream entries, newest
        first), at once."""
        last_key, stream_key = self.room_keys(room_name)
        pipe = self.client.pipeline(transaction=True)
        pipe.get(last_key)
        pipe.get(self.epoch_key(room_name))
        pipe.xrevrange(stream_key, "+", "-", count=self.history)
        return pipe.execute()

    def _diverged(self, room, newest_first):
        """Redis holds another message under the newest id of the copy: it lost that one and
        gave its id again (a replica promoted before it had it). Clients that saw the copy's
        message are told "reset" rather than silently skipping its replacement."""
        if not room.messages or not newest_first:
            return False
        newest = int(newest_first[0][0].split("-")[0])
        offset = newest - room.last_id
        if not 0 <= offset < len(newest_first):
            return False
        _entry_id, fields = newest_first[offset]
        if self.malformed_message(fields):
            return False  # _sync tells it as missed
        return self.fragment(room.last_id, fields["f"], fields["c"], fields["t"]) != room.messages[-1][1]

    # -- the reader ----------------------------------------------------------------
    def _follow(self):
        """The reader, for the bus's whole life: a Redis error connects again, a malformed
        entry is skipped, and any other error is logged and the reader starts again, each
        after a backoff. Starting again fetches every loaded room, so nothing is lost."""
        backoff = self.BACKOFF_FIRST
        checked = behind = None
        while not self.closing:
            try:
                if not self.reader_ok:
                    self._resume()
                    self.reader_ok = True
                    self.reader_status = "ok"
                    backoff = self.BACKOFF_FIRST
                    checked, behind = time.monotonic(), False  # it fetched every room just now
                seen = self.seen
                reply = self.reader_client.xread({self.POSTS: seen}, count=self.READ_BATCH,
                                                 block=self.READ_BLOCK_MS)
                read = 0
                for _stream, entries in reply or ():
                    read += len(entries)
                    for entry_id, fields in entries:
                        # past it first: an entry that fails is not read again, and starting
                        # again fetches its room
                        self.seen = entry_id
                        self._take(entry_id, fields)
                now = time.monotonic()
                if behind or read >= self.READ_BATCH or now - checked >= self.TRIM_CHECK_EVERY:
                    checked = now
                    if self._trimmed_past(seen):
                        self._refetch_every_room()
                behind = read >= self.READ_BATCH
            except (self.redis.RedisError, OSError, ValueError) as exc:
                # ValueError: redis-py reading from a socket closed under it
                self._reader_down("reconnecting", exc)
                self.reader_reconnects += 1
                gevent.sleep(backoff)
                backoff = min(backoff * 2, self.BACKOFF_MAX)
            except Exception as exc:
                self._reader_down("restarting", exc)
                self.reader_restarts += 1
                bus_log("the Redis bus reader failed and starts again in %g s, fetching every room this "
                    "worker holds (please report this, with what follows):\n%s" % (backoff, traceback.format_exc()))
                gevent.sleep(backoff)
                backoff = min(backoff * 2, self.BACKOFF_MAX)

    def _reader_down(self, status, exc):
        self.reader_ok = False
        self.reader_status = status
        self.reader_error = self.error_text(exc)
        try:
            self.reader_client.connection.disconnect()
        except Exception:
            pass

    def _take(self, entry_id, fields):
        """Apply one entry of the global stream, unless it is not as the publish script
        writes it (anything with access to Redis may XADD there)."""
        problem = self.malformed(fields)
        if problem is None:
            self._apply(fields)
            return
        self.malformed_entries += 1
        self.reader_error = ("malformed entry %s: %s" % (entry_id, problem))[:self.ERROR_CHARS]
        bus_log("skipped entry %s of %s: %s; only chattle's post script may write there (find what else does, "
            "and remove the entry with XDEL %s %s)" % (entry_id, self.POSTS, problem, self.POSTS, entry_id))

    @classmethod
    def error_text(cls, exc):
        return ("%s: %s" % (type(exc).__name__, exc))[:cls.ERROR_CHARS]

    @classmethod
    def malformed(cls, fields):
        """Why a reader's entry (a dict of text fields) cannot be applied, or None."""
        if not isinstance(fields, dict):
            return "not a set of fields"
        missing = [name for name in cls.ENTRY_FIELDS if not isinstance(fields.get(name), str)]
        if missing:
            return "field %s missing" % ", ".join(missing)
        if not cls.ENTRY_ID.fullmatch(fields["i"]):
            return "id %r is not a message id" % fields["i"][:cls.ERROR_CHARS]
        if not cls.ENTRY_TS.fullmatch(fields["t"]):
            return "ts %r is not a time" % fields["t"][:cls.ERROR_CHARS]
        return None

    @staticmethod
    def stream_id(entry_id):
        milliseconds, _dash, sequence = entry_id.partition("-")
        return int(milliseconds), int(sequence or 0)

    def _trimmed_past(self, seen):
        """Whether entries after `seen` may have been trimmed from the global stream before
        the reader read them (a worker stalled while a burst went by): then its rooms could
        miss posts, and a quiet room would never be woken. The stream is trimmed from its
        oldest end, so that is when `seen` itself is gone: the first entry kept is after it,
        or the stream is empty and its last id is after it. Asked after a read that may have
        missed some (TRIM_CHECK_EVERY), and true once per trim (`trim_handled`); XDEL is
        covered by max-deleted-entry-id."""
        if seen in (None, "0-0"):
            return False  # started on an empty stream: the first read begins at its start
        try:
            info = self.reader_client.xinfo_stream(self.POSTS)
        except self.redis.ResponseError:
            return False  # no stream (yet): nothing was written since this reader started
        first = info.get("first-entry")
        mark = first[0] if first else info.get("last-generated-id") or "0-0"
        deleted = info.get("max-deleted-entry-id") or "0-0"  # Redis 7 and later
        mark = max(mark, deleted, key=self.stream_id)
        if self.stream_id(mark) <= max(self.stream_id(seen), self.stream_id(self.trim_handled)):
            return False
        self.trim_handled = mark
        bus_log("the Redis bus reader fell behind %s's trimming (it was at %s, the stream now starts after %s): "
            "fetching every room this worker holds again; a worker this far behind is overloaded or was "
            "stopped" % (self.POSTS, seen, mark))
        return True

    def reader_state(self):
        """How the reader is doing, for /stats and /health."""
        return {"state": self.reader_status, "restarts": self.reader_restarts,
                "reconnects": self.reader_reconnects, "malformed_entries": self.malformed_entries,
                "resyncs": self.resyncs, "last_error": self.reader_error}

    def _resume(self):
        """After a start or an outage: fix where to read from, then fill every loaded room,
        so anything written meanwhile (even if trimmed from the global stream) is seen."""
        if self.seen is None:
            newest = self.reader_client.xrevrange(self.POSTS, "+", "-", count=1)
            self.seen = newest[0][0] if newest else "0-0"
        self._refetch_every_room()

    def _refetch_every_room(self):
        self.resyncs += 1
        for room_name, state in list(self.loaded.items()):
            if state is True and room_name not in self.held_back:
                self.held_back[room_name] = []
                gevent.spawn(self._settle, room_name, True)

    def _apply(self, fields):
        """Add one entry of the global stream to this worker's copy of its room, without
        ever waiting: the reader serves every room, so a room that is loading, or must be
        fetched again, has its entries held back for the greenlet doing that (_settle)."""
        room_name = fields["r"]
        state = self.loaded.get(room_name)
        self.posts_received += 1
        if state is None:
            self.posts_received_for_rooms_not_held += 1
            return  # no poll has named it here; its first poll loads it from its stream
        held = self.held_back.get(room_name)
        if held is not None:
            held.append(fields)
        elif state is not True:
            self.held_back[room_name] = [fields]  # the load in progress applies them after it
        elif not self._add(self.rooms.get(room_name), fields):
            self.held_back[room_name] = [fields]
            gevent.spawn(self._settle, room_name)

    def _add(self, room, fields):
        """Add a reader's entry to the local copy; False when the copy must be fetched from
        Redis first: entries trimmed from the global stream left a hole, or the room expired
        in Redis and its ids started again (_sync finds Redis behind and resets it)."""
        message_id = int(fields["i"])
        fragment = self.fragment(message_id, fields["f"], fields["c"], fields["t"])
        epoch = fields.get("e")
        if self._follows(room, message_id, epoch):
            room.add(message_id, fragment)
            return True
        if epoch != room.epoch:
            return False  # another history: _sync starts the copy's again
        # An id the copy has already: this worker's own post, added when it was accepted.
        messages = room.messages
        index = message_id - messages[0][0] if messages else -1
        return 0 <= index < len(messages) and messages[index] == (message_id, fragment)

    def _settle(self, room_name, sync_first=False):
        """Apply the entries the reader held back for a room, fetching the room from Redis
        again where they do not follow its copy; in a greenlet of its own, never the reader's.
        While Redis does not answer (restarting, loading), it tries again, as the reader does."""
        held = self.held_back.get(room_name)
        try:
            for failure in range(self.SETTLE_TRIES):
                try:
                    self._settle_once(room_name, held, sync_first)
                    return
                except self.redis.RedisError:
                    if self.closing:
                        return
                    sync_first = True  # fetch it all again once Redis answers
                    gevent.sleep(min(self.BACKOFF_FIRST * 2 ** failure, self.BACKOFF_MAX))
            self.forget(room_name)  # Redis still does not answer: its next poll loads it afresh
        finally:
            self.held_back.pop(room_name, None)

    def _settle_once(self, room_name, held, sync_first):
        for attempt in range(self.LOAD_ATTEMPTS + 1):
            if self.loaded.get(room_name) is not True:
                return  # forgotten meanwhile: its next poll loads it afresh
            room = self.rooms.get(room_name)
            if not sync_first or attempt:
                while held and self._add(room, held[0]):
                    del held[0]
                if not held:
                    return
                if attempt == self.LOAD_ATTEMPTS:
                    break
            del held[:]  # read before the sync started: what it fetches holds them
            self._sync(room_name, room)
        self.forget(room_name)  # still behind after so many fetches: load it afresh

    def forget(self, room_name):
        """The worker dropped an unused room: its next poll loads it from Redis again."""
        if self.loaded.get(room_name) is True:
            del self.loaded[room_name]

    # -- state -------------------------------------------------------------------------
    def health(self):
        """(ok, why not). Redis answering is what counts: the reader reconnects within
        BACKOFF_MAX of it."""
        try:
            self.client.ping()
        except self.redis.RedisError as exc:
            return False, "Redis does not answer (%s: %s)" % (type(exc).__name__, exc)
        return True, None

    def healthy(self):
        return self.health()[0]

    def clock(self):
        """Redis' TIME, which stamps every `ts` (None while Redis is unreachable)."""
        try:
            seconds, microseconds = self.client.time()
        except self.redis.RedisError:
            return None
        return seconds + microseconds / 1e6

    def close(self):
        self.closing = True
        self.reader.kill(block=True, timeout=1)  # before its socket is closed under it
        if self.reader_client.connection is not None:
            self.reader_client.connection.disconnect()  # made outside its pool, which would not close it
        for client in (self.client, self.reader_client):
            try:
                client.close()
                client.connection_pool.disconnect()
            except Exception:
                pass


class RedisClusterBus(RedisBus):
    """The shared bus on a Redis Cluster: the rooms spread over its masters, each room on one.

    Each room's keys share the hash tag of its name, so a room lives in one slot of one
    master, where the post script runs. The script also publishes the post on the room's
    shard channel (SPUBLISH `chattle:{<room>}:posts`, in the same slot). Each worker has one
    subscriber connection per master it reads from (ShardReader), SSUBSCRIBEd to the
    channels of the rooms it holds there and to no others: a worker is given the posts of
    its own rooms only, however many other rooms the cluster serves. A room is subscribed
    before it is loaded from its stream, and unsubscribed when the worker forgets it.

    Pub/Sub delivers at most once: a message sent while a subscriber is not connected is
    gone. So a room is fetched from its stream again whenever its subscription is made
    anew (a reconnect, a failover, a slot moved to another master: subscribed first, then
    fetched, so nothing written in between is missed; what comes twice is dropped by its
    id), and a message whose id does not follow the copy has the room fetched again, as
    the single-Redis reader does. A watcher follows the topology and moves the rooms'
    subscriptions to the masters now serving them.

    With `wait_ms`, a post is answered 201 only once a replica has it (WAIT 1 <ms>), and
    the subscribers and loads read the replicas: a worker then serves only what a replica
    holds, so what any client was given, and every post acknowledged, survives the
    promotion of that replica. The post is published only after its WAIT confirmed it
    (a second round trip): a shard message reaches the replicas over the cluster bus, not
    the replication stream, so published by the script it could outrun the data. A post
    no replica confirmed is not published; the room's next post (its id leaves a gap) or
    a fetch brings it to the other workers. Without `wait_ms`, a post is served as soon as
    its master has it, and a master that dies before its replica has the newest posts
    takes them with it.
    """

    name = "redis-cluster"
    CHANNEL = "chattle:{%s}:posts"  # a room's shard channel: the hash tag of its keys, so its slot
    TOPOLOGY_EVERY = 5.0        # seconds between looks at the slots besides those an error asks for
    REDIRECTS = 5               # MOVED or ASK: a post looks again this often at most
    POOL_SIZE = 256             # connections per node: a full pool answers 503

    # KEYS: the room's last id, its stream, its epoch, its slot's rooms (rooms_key); a post
    # with an Idempotency-Key also its key (IDEMPOTENCY_KEY, in the room's slot), and its
    # window in seconds as ARGV[9].
    # ARGV: room, from, content, room stream length,
    # the room's TTL, '1' to publish the post here ('0': the caller publishes it once a
    # replica confirmed it), the room's channel, the most rooms the slot holds. The channel,
    # in the room's slot by its hash
    # tag, is not passed as a key: a slot being migrated answers TRYAGAIN to a script naming
    # a key it does not hold. The id goes out as a string: cjson writes 14 digits only.
    # A post sent again is answered as RedisBus's is; it writes its key once more (the same
    # value and expiry): WAIT confirms what its own connection wrote, and so the first post.
    PUBLISH_SCRIPT = """
if KEYS[5] then
  local posted = redis.call('GET', KEYS[5])
  if posted then
    redis.call('SET', KEYS[5], posted, 'KEEPTTL')
    local id, ts, epoch = string.match(posted, '^(%d+) (%S+) (%S+)$')
    return {tonumber(id), ts, epoch, 'replayed'}
  end
end
""" + ROOMS_BOUND_SCRIPT % {"rooms": "KEYS[4]", "ttl": "ARGV[5]", "bound": "ARGV[8]"} + """
local id = redis.call('INCR', KEYS[1])
local now = redis.call('TIME')
local ts = now[1] .. '.' .. string.format('%06d', tonumber(now[2]))
""" + EPOCH_LUA.replace("EPOCH_KEY", "KEYS[3]").replace("STREAM_KEY", "KEYS[2]") + """
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], id .. '-0', 'f', ARGV[2], 'c', ARGV[3], 't', ts)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[5])
if ARGV[6] == '1' then
  redis.call('SPUBLISH', ARGV[7], cjson.encode({r=ARGV[1], i=string.format('%d', id), f=ARGV[2], c=ARGV[3], t=ts,
                                                e=epoch}))
end
if KEYS[5] then
  redis.call('SET', KEYS[5], id .. ' ' .. ts .. ' ' .. epoch, 'EX', ARGV[9])
end
return {id, ts, epoch}
"""
    IDEMPOTENCY_KEY = "chattle:{%s}:idem:%s"  # room (its hash tag), Idempotency-Key
    FETCH_SCRIPT = """
return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[3]),
        redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[1])}
"""

    SLOTS = 16384

    def __init__(self, rooms, addresses, history, room_ttl=7 * 24 * 3600, wait_ms=0, idempotency_seconds=300,
                 max_rooms=1000000):
        import hashlib

        import redis
        from redis.backoff import NoBackoff
        from redis.cluster import ClusterNode
        from redis.retry import Retry

        self.redis = redis
        self.rooms = rooms
        self.history = history
        self.room_ttl = room_ttl
        self.wait_ms = wait_ms
        self.idempotency_seconds = idempotency_seconds
        self.read_replicas = wait_ms > 0
        # One script reads the keys of one slot only: the bound is kept per slot, a share of it each.
        self.max_rooms = max_rooms
        self.rooms_per_slot = -(-max_rooms // self.SLOTS)
        self.slot_tags()
        rooms.on_forget = self.forget
        # No retries: a post whose reply was lost must not be written twice (MOVED and ASK
        # are still followed: a redirected command was not run).
        self.no_retry = Retry(NoBackoff(), 0)
        startup = []
        for address in addresses.split(","):
            host, _colon, port = address.strip().rpartition(":")
            if not host or not port.isdigit():
                raise SystemExit("chattle: --redis-cluster takes host:port[,host:port...], not %r" % addresses)
            startup.append(ClusterNode(host, int(port)))
        self.addresses, self.startup = addresses, startup
        self.cluster = None         # until the cluster answers and is ok (_connect)
        self.down_reason = "not connected to the Redis Cluster at %s yet" % addresses
        self.publish_sha = hashlib.sha1(self.PUBLISH_SCRIPT.encode()).hexdigest()
        self.loaded = {}
        self.held_back = {}
        self.stale = set()          # rooms to fetch again once the catch-up under way is done
        self.closing = False
        self.posts_received = 0
        self.posts_received_for_rooms_not_held = 0
        self.readers = {}           # master's name -> its ShardReader
        self.subscribed = {}        # room name -> the master's name whose reader holds its subscription
        self.catching_up = {}
        self.reader_restarts = self.reader_reconnects = self.malformed_entries = 0
        self.reader_error = None
        self.topology_changed = Event()
        self._connect()  # now, so that a cluster that is up serves the first request
        self.reader = gevent.spawn(self._watch)

    def _connect(self):
        """Make the cluster's client; False (and `down_reason` says why) while no node answers,
        or the cluster is not ok. Meanwhile the bus is down, not stopped: posts and polls
        that need the cluster answer 503, /health names the reason, and the watcher tries
        again until it can (a worker must boot and serve while its cluster is away)."""
        from redis.cluster import RedisCluster

        cluster = None
        try:
            self._check_ok(self.addresses, self.startup)
            cluster = RedisCluster(
                startup_nodes=self.startup, decode_responses=True, retry=self.no_retry,
                require_full_coverage=False, socket_timeout=self.SOCKET_TIMEOUT,
                socket_connect_timeout=self.SOCKET_TIMEOUT, max_connections=self.POOL_SIZE)
            for node in cluster.get_primaries():
                self._check_ok(self.addresses, [node])
        except BusUnavailable as exc:
            reason = str(exc)
        except Exception as exc:  # redis-py also fails with IndexError on a cluster with no master
            reason = ("the Redis Cluster at %s cannot be used (%s: %s); start it (`make redis-cluster`), "
                      "or check --redis-cluster" % (self.addresses, type(exc).__name__, exc))
        else:
            self.cluster = cluster
            return True
        if cluster is not None:
            try:
                cluster.close()
            except Exception:
                pass
        self.down_reason = reason
        return False

    def _check_ok(self, addresses, nodes):
        """BusUnavailable, saying what to do, unless every node of `nodes` that answers says
        the cluster is ok, and at least one answers."""
        answered = 0
        for node in nodes:
            try:
                client = self.redis.Redis(host=node.host, port=node.port, decode_responses=True,
                                          socket_timeout=self.SOCKET_TIMEOUT,
                                          socket_connect_timeout=self.SOCKET_TIMEOUT)
                try:
                    state = client.execute_command("CLUSTER INFO").get("cluster_state")
                finally:
                    client.close()
            except self.redis.RedisError:
                continue
            answered += 1
            if state != "ok":
                raise BusUnavailable(
                    "the Redis Cluster at %s is not ok (cluster_state:%s on %s:%d); wait until "
                    "`redis-cli -h %s -p %d cluster info` says cluster_state:ok, or repair it with "
                    "`redis-cli --cluster fix %s:%d`"
                    % (addresses, state, node.host, node.port, node.host, node.port, node.host, node.port))
        if not answered:
            raise BusUnavailable("no node of the Redis Cluster at %s answers; start it "
                                 "(`make redis-cluster`), or check --redis-cluster" % addresses)

    @staticmethod
    def room_keys(room_name):
        return "chattle:{%s}:last" % room_name, "chattle:{%s}:stream" % room_name

    @staticmethod
    def epoch_key(room_name):
        return "chattle:{%s}:epoch" % room_name

    _slot_tags = None  # slot -> a hash tag in it, made once per process

    @classmethod
    def rooms_key(cls, room_name):
        """The set of the rooms of the room's slot (ROOMS_BOUND_SCRIPT): in that slot, so the
        room's post script may use it, and moved with the slot when it moves."""
        return "chattle:rooms:{%s}" % cls.slot_tags()[crc_hqx(room_name.encode(), 0) % cls.SLOTS]

    @classmethod
    def slot_tags(cls):
        if cls._slot_tags is None:
            tags, number = [None] * cls.SLOTS, 0
            missing = cls.SLOTS
            while missing:  # about 170,000 hashes (0.2 s), once, when the bus is made
                tag = b"%x" % number
                slot = crc_hqx(tag, 0) % cls.SLOTS
                if tags[slot] is None:
                    tags[slot] = tag.decode()
                    missing -= 1
                number += 1
            cls._slot_tags = tags
        return cls._slot_tags

    # -- the topology ----------------------------------------------------------------------
    def _masters(self):
        """{master's name: (master, the node its rooms are read from)} as the client's slot
        table has it now."""
        masters = {}
        for nodes in list(self.cluster.nodes_manager.slots_cache.values()):
            if nodes and nodes[0].name not in masters:
                masters[nodes[0].name] = (nodes[0], nodes[1] if self.read_replicas and len(nodes) > 1 else nodes[0])
        return masters

    def _master_of(self, key):
        """The master serving `key` now."""
        if self.cluster is None:
            raise BusUnavailable(self.down_reason)
        nodes = self.cluster.nodes_manager.slots_cache.get(self.cluster.keyslot(key))
        if not nodes:
            raise BusUnavailable("no master serves the room's slot")
        return nodes[0]

    def _moved(self, redirect):
        """A MOVED answer: the slot's owner as its old owner says, at once, as redis-py does
        (reading the whole table again may ask a node that has not heard of the move yet);
        the watcher then reads the whole table, and moves the subscriptions."""
        manager = self.cluster.nodes_manager
        manager.move_slot(redirect)
        manager.create_redis_connections(manager.slots_cache[redirect.slot_id][:1])
        self.topology_changed.set()

    def _watch(self):
        self.topology_changed.set()
        while not self.closing:
            if self.cluster is None:  # not reachable, or not ok, at start
                if not self._connect():
                    gevent.sleep(self.BACKOFF_MAX)
                continue
            self.topology_changed.wait(self.TOPOLOGY_EVERY)
            self.topology_changed.clear()
            try:
                self.cluster.nodes_manager.initialize(disconnect_startup_nodes_pools=False)
                masters = self._masters()
            except Exception:
                gevent.sleep(self.BACKOFF_MAX)
                self.topology_changed.set()
                continue
            for name, (node, source) in masters.items():
                current = self.readers.get(name)
                if current is None or current.source.name != source.name or current.greenlet.dead:
                    # its rooms go with it, each fetched again once subscribed on the new node
                    self.readers[name] = ShardReader(self, node, source, current.rooms if current else ())
                    if current is not None:
                        current.stop()
            for name in [name for name in self.readers if name not in masters]:
                self.readers.pop(name).stop()
            self._place_subscriptions()

    def _place_subscriptions(self):
        """Every held room subscribed on the reader of the master serving it now (a failover,
        a slot moved, a subscription Redis dropped)."""
        for room_name, held_by in list(self.subscribed.items()):
            try:
                master = self._master_of(self.room_keys(room_name)[0]).name
            except BusUnavailable:
                continue  # no master serves it: its posts are refused meanwhile
            reader = self.readers.get(master)
            if reader is None or room_name in reader.rooms:
                continue
            previous = self.readers.get(held_by)
            if previous is not None and previous is not reader:
                previous.remove(room_name)
            self.subscribed[room_name] = master
            reader.add(room_name, fetch_after=True)

    def _read_node(self, key):
        """The node reads of `key` go to: its master, or with `wait_ms` its replica (the one
        a failover promotes), while it has one."""
        nodes = self.cluster.nodes_manager.slots_cache.get(self.cluster.keyslot(key)) or [None]
        return nodes[1] if self.read_replicas and len(nodes) > 1 else nodes[0]

    # -- posts ---------------------------------------------------------------------
    def publish(self, room_name, sender, content, idempotency_key=None):
        last_key, stream_key = self.room_keys(room_name)
        channel = self.CHANNEL % room_name
        keys = [last_key, stream_key, self.epoch_key(room_name), self.rooms_key(room_name)]
        args = [room_name, sender, content, self.history, self.room_ttl, "1", channel, self.rooms_per_slot]
        if idempotency_key is not None:
            keys.append(self.IDEMPOTENCY_KEY % (room_name, idempotency_key))
            args.append(self.idempotency_seconds)
        asking = None
        for _attempt in range(self.REDIRECTS):
            node = self._master_of(last_key)
            # A master with no replica listed has none a failover could promote, and none to
            # confirm: WAIT would refuse every post of its rooms.
            nodes = self.cluster.nodes_manager.slots_cache.get(self.cluster.keyslot(last_key)) or ()
            wait_ms = self.wait_ms if len(nodes) > 1 else 0
            args[5] = "0" if wait_ms else "1"
            if asking is not None:
                # the slot is moving there: post on that node
                node = self.cluster.get_node(node_name=asking) or node
            try:
                pipe = node.redis_connection.pipeline(transaction=False)
                if asking is not None:
                    pipe.execute_command("ASKING")
                pipe.execute_command("EVALSHA", self.publish_sha, len(keys), *keys, *args)
                if wait_ms:
                    pipe.execute_command("WAIT", 1, wait_ms)
                replies = pipe.execute(raise_on_error=False)
            except (self.redis.RedisError, OSError) as exc:
                self.topology_changed.set()
                raise BusUnavailable(type(exc).__name__,
                                     maybe_written=not never_sent(self.redis, exc, one_command=not wait_ms))
            if asking is not None:
                replies = replies[1:]
                asking = None
            posted = replies[0]
            if isinstance(posted, self.redis.exceptions.AskError):
                asking = "%s:%s" % (posted.host, posted.port)
                continue
            if isinstance(posted, self.redis.exceptions.MovedError):
                self._moved(posted)
                continue
            if isinstance(posted, self.redis.exceptions.NoScriptError):
                node.redis_connection.script_load(self.PUBLISH_SCRIPT)
                continue
            if isinstance(posted, Exception):
                raise BusUnavailable(type(posted).__name__)
            if posted[0] == -1:
                raise RoomsFull("the room's slot of the shared bus holds its maximum of %d rooms, each posted "
                                "to within %d s: post to a room that exists, or to a new one once the least "
                                "recently posted there expires (Retry-After)" % (self.rooms_per_slot, self.room_ttl),
                                retry_after=posted[1])
            if wait_ms and not (isinstance(replies[1], int) and replies[1] >= 1):
                raise BusUnavailable("no replica confirmed the post within %d ms" % wait_ms, maybe_written=True)
            break
        else:
            raise BusUnavailable("the room's slot kept moving")
        message_id, ts, epoch = posted[0], posted[1], posted[2]
        if posted[-1] == "replayed":  # posted by its first sending
            if wait_ms:
                self._announce_again(room_name, last_key, stream_key, channel, int(message_id), epoch)
            return {"id": int(message_id), "ts": float(ts), "epoch": epoch, "replayed": True}
        if wait_ms:
            self._announce(last_key, channel, {"r": room_name, "i": str(message_id), "f": sender, "c": content,
                                               "t": ts, "e": epoch})
        return self._posted(room_name, sender, content, int(message_id), ts, epoch)

    def _announce(self, last_key, channel, fields):
        """Publish a post a replica confirmed, on the room's master, where subscribers of the
        room's shard (its replicas too) are given it. The post is written and confirmed
        whatever happens here: a publish lost with its node is made up for by the fetch
        that follows every new subscription, and a gap by the next post."""
        try:
            self._master_of(last_key).redis_connection.execute_command("SPUBLISH", channel, encode(fields))
        except (self.redis.RedisError, OSError, BusUnavailable):
            self.topology_changed.set()

    def _announce_again(self, room_name, last_key, stream_key, channel, message_id, epoch):
        """Announce a post sent again, now confirmed, as its first sending wrote it: that one
        was not announced if no replica confirmed it in time. A subscriber that has it already
        drops it by its id."""
        try:
            written = self._master_of(last_key).redis_connection.xrange(
                stream_key, "%d-0" % message_id, "%d-0" % message_id)
        except (self.redis.RedisError, OSError, BusUnavailable):
            self.topology_changed.set()
            return
        for _entry_id, fields in written:
            self._announce(last_key, channel, {"r": room_name, "i": str(message_id), "f": fields["f"],
                                               "c": fields["c"], "t": fields["t"], "e": epoch})

    # -- polls -----------------------------------------------------------------------
    def _load(self, room_name, room):
        """Subscribe to the room's channel, then fetch it: a post written in between is in
        the fetch or in a message, never in neither."""
        loading = self.loaded[room_name] = Event()
        try:
            self._subscribe(room_name)
            self._sync(room_name, room)
            self.loaded[room_name] = True
        except (self.redis.RedisError, BusUnavailable) as exc:
            del self.loaded[room_name]
            self.held_back.pop(room_name, None)  # its next load reads them from its stream
            self.stale.discard(room_name)
            self._unsubscribe(room_name)
            self.rooms.release(room)
            raise exc if isinstance(exc, BusUnavailable) else BusUnavailable(type(exc).__name__)
        finally:
            loading.set()
        if room_name in self.held_back:
            gevent.spawn(self._settle, room_name)

    def _subscribe(self, room_name):
        key = self.room_keys(room_name)[0]
        master = self._master_of(key)
        reader = self.readers.get(master.name)
        if reader is None:  # before the watcher's first look
            reader = self.readers[master.name] = ShardReader(self, master, self._read_node(key))
        held_by = self.subscribed.get(room_name)
        if held_by is not None and held_by != master.name and held_by in self.readers:
            self.readers[held_by].remove(room_name)
        self.subscribed[room_name] = master.name
        confirmed = reader.add(room_name)
        if reader.down and not confirmed.is_set():
            raise BusUnavailable("the room's node does not answer")  # rather than each poll waiting for it
        if not confirmed.wait(self.SOCKET_TIMEOUT):
            raise BusUnavailable("the room's node did not confirm its subscription")

    def _unsubscribe(self, room_name):
        reader = self.readers.get(self.subscribed.pop(room_name, None))
        if reader is not None:
            reader.remove(room_name)

    def forget(self, room_name):
        """The worker dropped an unused room: its next poll loads it from Redis again, and
        its posts are no longer sent here."""
        if self.loaded.get(room_name) is True:
            del self.loaded[room_name]
            self.stale.discard(room_name)
            self._unsubscribe(room_name)

    def _fetch(self, room_name):
        if self.read_replicas:
            return self._fetch_from(self._read_node(self.room_keys(room_name)[0]), room_name)
        try:
            # EVAL, not EVALSHA: a script missing on a node would be loaded on every master,
            # and one master down would then fail the reads of all the others' rooms
            last, epoch, newest_first = self.cluster.eval(self.FETCH_SCRIPT, 3, *self.room_keys(room_name),
                                                          self.epoch_key(room_name), self.history)
        except self.redis.exceptions.RedisClusterException as exc:
            raise self.redis.ConnectionError(str(exc))
        return last, epoch, [(entry_id, dict(zip(fields[::2], fields[1::2]))) for entry_id, fields in newest_first]

    def _head(self, room_name):
        try:
            return self.cluster.mget(self.room_keys(room_name)[0], self.epoch_key(room_name))
        except self.redis.exceptions.RedisClusterException as exc:
            raise self.redis.ConnectionError(str(exc))

    def _fetch_from(self, node, room_name):
        if node is None:
            raise self.redis.ConnectionError("no node serves the room's slot")
        pipe = node.redis_connection.pipeline(transaction=False)
        pipe.execute_command("READONLY")  # a replica serves its slots' reads only when asked so
        pipe.execute_command("ROLE")
        pipe.execute_command("EVAL_RO", self.FETCH_SCRIPT, 3, *self.room_keys(room_name), self.epoch_key(room_name),
                             self.history)
        try:
            _readonly, role, (last, epoch, newest_first) = pipe.execute()
            # A node the slot table still calls a replica may be an old master started again,
            # serving its own data until it learns it was failed over: read only a replica
            # connected to its master (or the master itself, while it has no replica).
            if role[0] != "master" and not (role[0] == "slave" and role[3] == "connected"):
                raise self.redis.ConnectionError("%s:%s is not a replica in sync" % (node.host, node.port))
            if role[0] == "master" and node is not self._master_of(self.room_keys(room_name)[0]):
                raise self.redis.ConnectionError("%s:%s is not the room's master" % (node.host, node.port))
        except self.redis.RedisError:
            self.topology_changed.set()
            raise
        return last, epoch, [(entry_id, dict(zip(fields[::2], fields[1::2]))) for entry_id, fields in newest_first]

    # -- what the subscribers are given ------------------------------------------------------
    def _receive(self, payload):
        """A shard message: applied unless it is not as the post script publishes it."""
        try:
            fields = json.loads(payload)
            problem = self.malformed(fields)
        except ValueError:
            problem = "not JSON"
        if problem is None:
            self._apply(fields)
            return
        self.malformed_entries += 1
        self.reader_error = ("malformed message: %s" % problem)[:self.ERROR_CHARS]
        bus_log("skipped a message on a room's shard channel: %s; only chattle's post script may publish "
                "there (find what else does): %r" % (problem, payload[:self.ERROR_CHARS]))

    def reader_state(self):
        """The shard readers together: "ok" while each is connected."""
        readers = list(self.readers.values())
        state = "starting" if not readers else "ok" if all(r.connection is not None for r in readers) \
            else "reconnecting"
        return {"state": state, "restarts": self.reader_restarts, "reconnects": self.reader_reconnects,
                "malformed_entries": self.malformed_entries, "resyncs": 0, "last_error": self.reader_error}

    def _refetch(self, room_name):
        """Fetch a held room from its stream again: its subscription was made anew, and
        what was published while it had none is only there."""
        state = self.loaded.get(room_name)
        if state is None:
            return
        if room_name in self.held_back or state is not True:
            # a load or catch-up under way read it, perhaps before the subscription: once
            # more after it (a load's end starts the catch-up of what it holds back)
            self.stale.add(room_name)
            self.held_back.setdefault(room_name, [])
            return
        self.held_back[room_name] = []
        gevent.spawn(self._settle, room_name, True)

    def _settle(self, room_name, sync_first=False):
        while True:
            RedisBus._settle(self, room_name, sync_first)
            if room_name not in self.stale:
                return
            self.stale.discard(room_name)
            if self.closing or self.loaded.get(room_name) is not True or room_name in self.held_back:
                return
            self.held_back[room_name] = []
            sync_first = True

    # -- state -------------------------------------------------------------------------
    def health(self):
        if self.cluster is None:
            return False, self.down_reason
        try:
            if self.cluster.ping(target_nodes=self.cluster.PRIMARIES):
                return True, None
            return False, "a master of the Redis Cluster does not answer PING"
        except (self.redis.RedisError, self.redis.exceptions.RedisClusterException) as exc:
            return False, "a master of the Redis Cluster does not answer (%s: %s)" % (type(exc).__name__, exc)

    def clock(self):
        if self.cluster is None:
            return None
        try:
            seconds, microseconds = self.cluster.time(target_nodes=self.cluster.get_random_node())
        except (self.redis.RedisError, self.redis.exceptions.RedisClusterException):
            return None
        return seconds + microseconds / 1e6

    def close(self):
        self.closing = True
        self.reader.kill(block=True, timeout=1)
        for reader in list(self.readers.values()):
            reader.stop()
        try:
            self.cluster.close()
        except Exception:
            pass


class ShardReader:
    """One subscriber connection of a worker: to the node it reads one master's rooms from
    (the master, or with `wait_ms` its replica), SSUBSCRIBEd to the shard channels of the
    rooms the worker holds there, and to no other.

    One greenlet reads the connection, one writes to it: subscribing and unsubscribing only
    queue a command, so they never wait (Rooms forgets rooms in the middle of an add).
    Every subscription confirmed on a new connection, or moved here, has its room fetched
    again (the bus's _refetch): what was published meanwhile went to nobody."""

    def __init__(self, bus, master, source, rooms=()):
        self.bus, self.master, self.source = bus, master, source
        self.rooms = {}             # room name -> Event set once this connection confirmed its subscription
        self.refetch = set(rooms)   # rooms to fetch again once their subscription is confirmed
        self.unsubscribing = {}     # channel -> SUNSUBSCRIBEs sent, not yet answered
        for room_name in rooms:
            self.rooms[room_name] = Event()
        self.connection = None
        self.down = False           # its last attempt to connect failed
        self.outbox = deque()       # commands for the writer, on the current connection only
        self.outbox_filled = Event()
        self.greenlet = gevent.spawn(self._read)
        self.helpers = [gevent.spawn(self._write), gevent.spawn(self._keep_alive)]

    def add(self, room_name, fetch_after=False):
        """Subscribe (now if connected, else on connecting); the Event its confirmation sets."""
        confirmed = self.rooms.get(room_name)
        if confirmed is None:
            confirmed = self.rooms[room_name] = Event()
            if fetch_after:
                self.refetch.add(room_name)
            self._queue("SSUBSCRIBE", self.bus.CHANNEL % room_name)
        return confirmed

    def remove(self, room_name):
        if self.rooms.pop(room_name, None) is None:
            return
        self.refetch.discard(room_name)
        if self.connection is not None:
            channel = self.bus.CHANNEL % room_name
            self.unsubscribing[channel] = self.unsubscribing.get(channel, 0) + 1
            self._queue("SUNSUBSCRIBE", channel)

    def _queue(self, *words):
        if self.connection is not None:  # otherwise connecting subscribes every room
            self.outbox.append(words)
            self.outbox_filled.set()

    def _write(self):
        redis = self.bus.redis
        while True:
            self.outbox_filled.wait()
            self.outbox_filled.clear()
            while self.outbox:
                words = self.outbox.popleft()
                connection = self.connection
                if connection is None:
                    continue
                try:
                    connection.send_command(*words)
                except (redis.RedisError, OSError):
                    # redis-py closed it: the reader fails, and connects again
                    if self.connection is connection:
                        self.connection = None
                        self.outbox.clear()

    def _keep_alive(self):
        """A PING now and then: a node gone silent fails the read (socket timeout) instead
        of holding the subscriptions in a connection nothing comes through."""
        while True:
            gevent.sleep(self.bus.READ_BLOCK_MS / 1000.0)
            self._queue("PING")

    def _read(self):
        bus, redis = self.bus, self.bus.redis
        backoff = bus.BACKOFF_FIRST
        while not bus.closing:
            connection = None
            try:
                connection = self._connect()
                self.down = False
                while True:
                    try:
                        reply = connection.read_response(disconnect_on_error=False)
                    except redis.exceptions.MovedError as moved:
                        self._moved(moved)
                        continue
                    self._receive(reply)
                    backoff = bus.BACKOFF_FIRST
            except (redis.RedisError, OSError, ValueError) as exc:
                # ValueError: redis-py reading from a socket closed under it
                bus.reader_reconnects += 1
                bus.reader_error = bus.error_text(exc)
                self.down = connection is None
                self._lost(connection)
                bus.topology_changed.set()
                gevent.sleep(backoff)
                backoff = min(backoff * 2, bus.BACKOFF_MAX)
            except Exception as exc:
                # connecting again subscribes and fetches every room of this master: nothing is lost
                bus.reader_restarts += 1
                bus.reader_error = bus.error_text(exc)
                bus_log("a Redis Cluster shard reader failed and starts again in %g s, fetching the rooms "
                        "it holds (please report this, with what follows):\n%s" % (backoff, traceback.format_exc()))
                self._lost(connection)
                bus.topology_changed.set()
                gevent.sleep(backoff)
                backoff = min(backoff * 2, bus.BACKOFF_MAX)

    def _connect(self):
        redis = self.bus.redis
        connection = redis.Connection(
            host=self.source.host, port=self.source.port, decode_responses=True, protocol=2,
            socket_timeout=self.bus.READ_BLOCK_MS / 1000.0 + 5, socket_connect_timeout=self.bus.SOCKET_TIMEOUT,
            retry=self.bus.no_retry)
        try:
            connection.connect()
            if self.source is not self.master:
                # a replica still loading, or cut off from its master, may be behind what its
                # master published: wait until it is in sync
                connection.send_command("INFO", "replication")
                if "master_link_status:up" not in connection.read_response():
                    raise redis.ConnectionError("the replica is not in sync with its master")
        except BaseException:
            connection.disconnect()
            raise
        self.connection = connection
        for room_name in self.rooms:
            self._queue("SSUBSCRIBE", self.bus.CHANNEL % room_name)
        return connection

    def _receive(self, reply):
        kind, channel = reply[0], reply[1]
        if kind == "smessage":
            self.bus._receive(reply[2])
        elif kind == "ssubscribe":
            room_name = self.room_of(channel)
            confirmed = self.rooms.get(room_name)
            if confirmed is not None:
                confirmed.set()
                if room_name in self.refetch:
                    self.refetch.discard(room_name)
                    self.bus._refetch(room_name)
        elif kind == "sunsubscribe":
            pending = self.unsubscribing.pop(channel, 0)
            if pending > 1:
                self.unsubscribing[channel] = pending - 1
            elif not pending:
                # Not asked for: the slot left this node. The watcher subscribes the room on
                # the node serving it now, and fetches it again.
                self.rooms.pop(self.room_of(channel), None)
                self.bus.topology_changed.set()

    def _moved(self, moved):
        """A subscription refused: the slot is served elsewhere. Its rooms are let go here
        (their loads go on; the watcher subscribes them where the slot is, and fetches them)."""
        cluster = self.bus.cluster
        for room_name, confirmed in list(self.rooms.items()):
            if cluster.keyslot(self.bus.room_keys(room_name)[0]) == moved.slot_id:
                del self.rooms[room_name]
                confirmed.set()
        self.bus._moved(moved)

    def room_of(self, channel):
        prefix, suffix = self.bus.CHANNEL.split("%s")
        return channel[len(prefix):-len(suffix)]

    def _lost(self, connection):
        if self.connection is connection:
            self.connection = None
        self.outbox.clear()
        for room_name, confirmed in list(self.rooms.items()):
            if confirmed.is_set():
                self.rooms[room_name] = Event()
        self.refetch.update(self.rooms)
        self.unsubscribing.clear()
        if connection is not None:
            try:
                connection.disconnect()
            except Exception:
                pass

    def stop(self):
        for helper in self.helpers:
            helper.kill(block=False)
        self.greenlet.kill(block=True, timeout=1)
        connection, self.connection = self.connection, None
        for confirmed in self.rooms.values():
            confirmed.set()  # a load waiting here goes on: the reader taking over fetches its room again
        if connection is not None:
            try:
                connection.disconnect()
            except Exception:
                pass


def make_bus(settings, rooms):
    if settings.redis_cluster:
        return RedisClusterBus(rooms, settings.redis_cluster, settings.history, settings.room_ttl,
                               settings.redis_wait, settings.idempotency_seconds, settings.max_bus_rooms)
    if settings.redis:
        return RedisBus(rooms, settings.redis, settings.history, settings.room_ttl, settings.idempotency_seconds,
                        settings.max_bus_rooms)
    return MemoryBus(rooms, settings.idempotency_seconds, settings.idempotency_keys)


###############################################################################
# Input checks
###############################################################################

_CONTROL_IN_NAME = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_IN_CONTENT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# JSON may escape half a surrogate pair ("\ud800"): no UTF-8 can carry it back out.
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
# Plain decimals only: Python's int() and float() also take "1_0", " 7 ", "1e3", "inf".
_PLAIN_NUMBER = {int: re.compile(r"-?[0-9]{1,30}"), float: re.compile(r"-?[0-9]{1,30}(\.[0-9]{1,30})?")}
_EPOCH = re.compile(r"[0-9A-Za-z]{1,32}")


def query_number(query, name, kind, low, high, default):
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw) if _PLAIN_NUMBER[kind].fullmatch(raw) else None
    except ValueError:
        value = None
    if value is None or value != value or not low <= value <= high:  # value != value: NaN
        raise json_error(400, "query parameter %r must be %s from %s to %s, got %r"
                         % (name, "an integer" if kind is int else "a number", low, high, raw[:40]))
    return value


def poll_arguments():
    """since, limit, timeout and epoch of a poll, from its query string.

    Parsed by Bottle's own query parser (the last value of a repeated name wins, as
    with request.query.get), but not through request.query: that FormsDict stays in
    the request's environ, and so in memory for as long as the poll is held."""
    query = dict(bottle._parse_qsl(request.environ.get("QUERY_STRING", "")))
    since = query_number(query, "since", int, 0, sys.maxsize, None)
    limit = query_number(query, "limit", int, 1, MAX_LIMIT,
                         DEFAULT_LIMIT_RECENT if since is None else DEFAULT_LIMIT_SINCE)
    timeout = query_number(query, "timeout", float, 0, MAX_POLL_TIMEOUT, settings.poll_timeout)
    epoch = query.get("epoch") or None
    if epoch is not None and not _EPOCH.fullmatch(epoch):
        raise json_error(400, "query parameter 'epoch' must be the 'epoch' of an answer (1 to 32 letters "
                         "and digits), got %r" % epoch[:40])
    return since, limit, timeout, epoch


def read_json_object():
    media_type = request.environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise json_error(415, "send the message as JSON with 'Content-Type: application/json'")
    raw_length = request.environ.get("CONTENT_LENGTH") or ""
    if raw_length:
        if not raw_length.isdigit():
            raise json_error(400, "Content-Length %r is not a byte count" % raw_length[:40])
        if int(raw_length) > MAX_BODY_BYTES:
            raise json_error(413, "body of %s bytes is over the %d byte limit" % (raw_length, MAX_BODY_BYTES),
                             Connection="close")
        to_read = int(raw_length)
    else:
        to_read = MAX_BODY_BYTES + 1  # chunked: read one byte past the limit to see it
    try:
        with gevent.Timeout(BODY_READ_TIMEOUT):
            body = request.environ["wsgi.input"].read(to_read)
    except gevent.Timeout:
        raise json_error(400, "the body did not arrive within %g seconds" % BODY_READ_TIMEOUT,
                         Connection="close")
    except (OSError, ValueError) as exc:
        raise json_error(400, "the body could not be read: %s" % exc, Connection="close")
    if len(body) > MAX_BODY_BYTES:
        raise json_error(413, "body is over the %d byte limit" % MAX_BODY_BYTES, Connection="close")
    if raw_length and len(body) < to_read:
        raise json_error(400, "the body ended after %d of %d bytes" % (len(body), to_read), Connection="close")
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise json_error(400, 'body is not JSON; send {"from": "<name>", "content": "<text>"}')
    except RecursionError:  # 16 KiB of "[" nests deeper than the parser recurses
        raise json_error(400, 'body nests too deep; send {"from": "<name>", "content": "<text>"}')
    if not isinstance(payload, dict):
        raise json_error(400, 'body must be a JSON object: {"from": "<name>", "content": "<text>"}')
    return payload


def checked_message(payload):
    sender, content = payload.get("from"), payload.get("content")
    if not isinstance(sender, str):
        raise json_error(400, "'from' is required and must be a string of 1 to %d characters" % MAX_FROM_CHARS)
    if not isinstance(content, str):
        raise json_error(400, "'content' is required and must be a string of 1 to %d characters"
                         % MAX_CONTENT_CHARS)
    sender = sender.strip()
    if not 1 <= len(sender) <= MAX_FROM_CHARS:
        raise json_error(400, "'from' must be 1 to %d characters after trimming, got %d"
                         % (MAX_FROM_CHARS, len(sender)))
    if not 1 <= len(content) <= MAX_CONTENT_CHARS:
        raise json_error(400, "'content' must be 1 to %d characters, got %d" % (MAX_CONTENT_CHARS, len(content)))
    if _CONTROL_IN_NAME.search(sender):
        raise json_error(400, "'from' may not contain control characters")
    if _CONTROL_IN_CONTENT.search(content):
        raise json_error(400, "'content' may not contain control characters other than newline and tab")
    for field, text in (("from", sender), ("content", content)):
        half_pair = _LONE_SURROGATE.search(text)
        if half_pair:
            raise json_error(400, "'%s' holds half of a UTF-16 surrogate pair (\\u%04x); send valid Unicode"
                             % (field, ord(half_pair.group())))
    return sender, content


###############################################################################
# The application
###############################################################################

def greenlet_local_property(name):
    """Bottle keeps `request` and `response` in six thread-locals; gevent makes each one a
    gevent.local whose first use in every new greenlet builds its own dict and weak
    reference, which was the largest single cost of answering a woken poll. The greenlet's
    own __dict__ holds the same per-greenlet state, and goes with the greenlet."""
    key = "chattle.bottle." + name

    def fget(_self):
        try:
            return getcurrent().__dict__[key]
        except KeyError:
            raise RuntimeError("Request context not initialized.")

    def fset(_self, value):
        getcurrent().__dict__[key] = value

    def fdel(_self):
        del getcurrent().__dict__[key]

    return property(fget, fset, fdel)


# Every per-request attribute Bottle keeps in a thread-local, by class.
BOTTLE_LOCAL_STATE = ((bottle.LocalRequest, ("environ",)),
                      (bottle.LocalResponse, ("_status_line", "_status_code", "_cookies", "_headers", "body")))
for _cls, _names in BOTTLE_LOCAL_STATE:
    for _name in _names:
        setattr(_cls, _name, greenlet_local_property("%s.%s" % (_cls.__name__, _name)))

app = Bottle()
# Every route returns bytes or raises HTTPResponse itself: the JSON and template plugins
# would only wrap each answer in one more call (a cost paid per woken poll).
app.uninstall(True)
# The name gunicorn and other WSGI servers look for: the bound method, as make_server
# serves, since calling the Bottle instance adds a level of C stack to every held poll.
application = app.wsgi
# Nearly every answer is JSON; the page sets its own type.
bottle.LocalResponse.default_content_type = JSON_TYPE

settings = Settings.from_environ()
rooms = Rooms.from_settings(settings)
bus = None  # made on first use, in the process that serves (after gunicorn forks)
bus_calls = 0  # requests inside the bus now: a stopping `python chattle.py` waits for them (serve)


def configure(new_settings):
    """Apply settings before serving; replaces the rooms and the bus."""
    global settings, rooms, bus
    if bus is not None:
        bus.close()
    settings = new_settings
    rooms = Rooms.from_settings(settings)
    bus = None


def get_bus():
    global bus
    if bus is None:
        made = make_bus(settings, rooms)
        # Making a bus may wait on the network (the cluster bus asks its nodes), and a
        # request that came meanwhile made one too: one is kept, the other closed, so no
        # second reader follows every post for nobody.
        if bus is None:
            bus = made
        else:
            made.close()
    return bus


def json_answer(body, status=200):
    # 200 and JSON are what every answer starts as (LocalResponse.default_content_type): setting
    # them again cost each woken poll about 7 us of bottle's header handling.
    if status != 200:
        response.status = status
    if rooms.closing:
        response.set_header("Connection", "close")
    return body


ROOM_URL = "/rooms/<room:re:%s>" % ROOM_PATTERN


@app.get("/")
@app.get(ROOM_URL)
def chat_page(room="lobby"):
    response.content_type = HTML_TYPE
    return template("index", room=room, template_lookup=[VIEWS_ROOT])


@app.get("/static/<path:path>")
def static(path):
    return static_file(path, root=STATIC_ROOT)


@app.get("/msgs")
@app.get(ROOM_URL + "/msgs")
def poll_messages(room="lobby"):
    since, limit, timeout, epoch = poll_arguments()
    global bus_calls
    bus_calls += 1
    try:
        chat = get_bus().room(room, since, epoch)
    except BusUnavailable as exc:
        raise json_error(503, "the shared bus is unreachable (%s); retry later" % exc, **{"Retry-After": "1"})
    except RoomsFull as exc:
        raise json_error(503, str(exc), **{"Retry-After": "%d" % exc.retry_after})
    finally:
        bus_calls -= 1
    environ = request.environ
    sends_json = environ.get(chattle_http.SENDS_JSON)
    # Both outlive forget_request: the connection holds the same objects.
    address = environ.get("REMOTE_ADDR")
    peer = environ.get(chattle_http.PEER) or environ.get("gunicorn.socket")
    held = since is not None and chat.holds(since, timeout, epoch)
    if held and not chat.registry.hold_poll(address):
        if chat.registry.release(chat):  # a room only this refused poll named would stay for good
            bus.forget(room)
        raise json_error(429, "too many polls held for the client address %s: at most %d "
                         "(--max-polls-per-address, CHATTLE_MAX_POLLS_PER_ADDRESS); poll again once one ends"
                         % (address, chat.registry.max_polls_per_address),
                         **{"Retry-After": "1", "Connection": "close"})
    if sends_json == chattle_http.FORGET and since is not None:
        forget_request()
    if epoch is None:
        # A client that names no history is taken to be in the one it arrived in: a poll
        # held across a start of the history is still told "reset".
        epoch = chat.epoch
    try:
        shared = since is not None and chat.wait_for_news(since, timeout, epoch, peer)
    finally:
        if held:
            chat.registry.end_poll(address)
    if shared is CLIENT_LEFT:
        if sends_json:  # chattle_http's handler closes the connection unanswered
            if rooms.release(chat):
                bus.forget(room)
            raise chattle_http.PeerGone
        # Another server (gunicorn's own worker): answered as at a timeout, and the
        # server finds the connection gone as it writes.
        shared = False
    body = chat.answer(since, limit, shared, epoch)
    if rooms.release(chat):
        bus.forget(room)
    if sends_json:
        # Straight to chattle_http's handler: every waiter of a fan-out sends the same head.
        raise chattle_http.SendJson(body, close=rooms.closing)
    return json_answer(body)


# The per-request state Bottle's response keeps in the greenlet (see greenlet_local_property).
BOTTLE_RESPONSE_STATE = tuple("chattle.bottle.LocalResponse." + name for name in BOTTLE_LOCAL_STATE[1][1])


def forget_request():
    """A poll that may be held keeps nothing of its request and response: the environ
    (its dict, headers, addresses, path, query and Bottle's route keys) is emptied, and
    Bottle's response state (a header dict among it) dropped, about 1.5 KB per held poll.
    Only where chattle_http says nothing reads them afterwards: the poll's answer leaves as
    SendJson, which neither Bottle nor the handler looks at them for."""
    request.environ.clear()
    state = getcurrent().__dict__
    for key in BOTTLE_RESPONSE_STATE:
        state.pop(key, None)


@app.post("/msgs")
@app.post(ROOM_URL + "/msgs")
def post_message(room="lobby"):
    sender, content = checked_message(read_json_object())
    key = idempotency_key()
    global bus_calls
    bus_calls += 1
    try:
        message = get_bus().publish(room, sender, content, key)
    except BusUnavailable as exc:
        if exc.maybe_written:
            error = ("the shared bus did not confirm the post (%s): its outcome is unknown, it may have been "
                     "posted; retry with the same Idempotency-Key, which posts it at most once" % exc)
        else:
            error = "the shared bus is unreachable (%s); nothing was written, retry later" % exc
        raise HTTPResponse(encode({"error": error, "outcome": "unknown" if exc.maybe_written else "not written"}),
                           503, {"Content-Type": JSON_TYPE, "Retry-After": "1"})
    except RoomsFull as exc:
        raise HTTPResponse(encode({"error": str(exc), "outcome": "not written"}), 503,
                           {"Content-Type": JSON_TYPE, "Retry-After": "%d" % exc.retry_after})
    finally:
        bus_calls -= 1
    return json_answer(encode({"room": room, "id": message["id"], "ts": message["ts"], "epoch": message["epoch"]}),
                       201)


_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,64}")


def idempotency_key():
    """The post's Idempotency-Key header (None without one): 1 to 64 visible ASCII characters."""
    key = request.environ.get("HTTP_IDEMPOTENCY_KEY")
    if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise json_error(400, "the Idempotency-Key header must be 1 to 64 visible ASCII characters "
                              "(no spaces), got %d characters" % len(key))
    return key


@app.get("/health")
def health():
    current = get_bus()
    ok, reason = current.health()
    # "time": the clock `ts` comes from, so a client on another host can measure its offset to it
    body = {"status": "ok" if ok else "degraded", "bus": current.name, "pid": os.getpid(),
            "time": current.clock() if ok else None}
    if current.reader_state() is not None:  # a shared bus: how its reader is doing
        body["bus_reader"] = current.reader_state()
    if not ok:
        body["reason"] = reason
    return json_answer(encode(body), 200 if ok else 503)


@app.get("/stats")
def stats():
    return json_answer(encode({
        "pid": os.getpid(),
        "bus": get_bus().name,
        "waiters": rooms.waiters,
        "rooms": len(rooms.by_name),
        "messages": rooms.retained(),
        "rss_bytes": rss_bytes(),
        "encodes": rooms.encodes,
        "rooms_forgotten": rooms.forgotten,
        "retained_bytes": rooms.retained_bytes,
        "answer_cache_bytes": rooms.cached_bytes,
        # what the bus's readers were given: every post of the cluster, or only the held rooms'
        "bus_posts_received": get_bus().posts_received,
        "bus_posts_received_for_rooms_not_held": get_bus().posts_received_for_rooms_not_held,
        "bus_reader": get_bus().reader_state(),
        # read together, so that descriptors beyond the open connections is exact
        "connections": chattle_http.open_connections(),
        # answers held for clients still taking them (bounded: max_unsent_bytes), and the
        # connections dropped to keep them so
        "unsent_bytes": chattle_http.unsent_bytes(),
        "unsent_dropped": chattle_http.unsent_dropped(),
        "descriptors": descriptors_open(),
        "protocol": PROTOCOL_VERSION,
    }))


def descriptors_open():
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
    except OSError:
        return None


def rss_bytes():
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def error_page(error):
    """Every error Bottle raises itself (404, 405, a crash) answers as JSON too."""
    response.content_type = JSON_TYPE
    if error.status_code == 404:
        message = ("no such route: %s %s; rooms are named by %s"
                   % (request.method, request.path[:200], ROOM_PATTERN))
    elif error.status_code == 405:
        message = "%s is not allowed here; use %s" % (request.method, response.get_header("Allow", "GET"))
    elif error.status_code >= 500:
        message = "the server failed on this request; it was not applied, please retry"
    else:
        message = str(error.body)[:200]
    return encode({"error": message})


app.default_error_handler = error_page


###############################################################################
# Serving with `python chattle.py`
###############################################################################



def pywsgi_handler_class(base=None):
    """chattle_http's handler (on `base`, pywsgi's or a subclass such as gunicorn's) under
    this process's settings."""
    return chattle_http.handler_class(settings.http_limits(), base, access_log=settings.access_log)


def pywsgi_server_class(base=None):
    """chattle_http's server (on `base`, pywsgi's or a subclass such as gunicorn's) under
    this process's settings."""
    return chattle_http.server_class(settings.http_limits(), base, access_log=settings.access_log)


def make_server(host, port):
    """The gevent pywsgi server `python chattle.py` runs (bench/anatomy.py measures it too).

    It is given `app.wsgi`, the Bottle application's own entry point, rather than `app`:
    calling an instance goes through its type's __call__ slot, one more level of C stack
    that every held poll's greenlet would keep while it waits."""
    return pywsgi_server_class()((host, port), app.wsgi, backlog=4096,
                                 log=sys.stderr if settings.access_log else None)


# Once in each serving process, after the application is loaded: the policy the load
# workers share, stated in chattle_limits.py.
tune_garbage_collector = collect_garbage_seldom

def say_if_degraded(current):
    """One line on stderr when the bus starts without its Redis: the process serves anyway
    (503 for what needs Redis) and recovers by itself once Redis answers."""
    ok, reason = current.health()
    if not ok:
        sys.stderr.write("chattle: the shared bus is unreachable (%s); posts and polls that need it answer "
                         "503 until it is back, /health says degraded\n" % reason)
        sys.stderr.flush()


def finish_bus_calls(timeout):
    """Wait, at most `timeout`, for the requests inside the bus: closed under them, a post Redis
    wrote would be answered 503 "nothing was written", or not at all."""
    deadline = time.monotonic() + timeout
    while bus_calls and time.monotonic() < deadline:
        gevent.sleep(0.01)


def serve(new_settings):
    configure(new_settings)
    raise_descriptor_limit()
    tune_garbage_collector()
    server = make_server(settings.host, settings.port)

    def stop(*_signal):
        rooms.close()
        gevent.spawn(server.stop, timeout=settings.stop_timeout)

    gevent.signal_handler(signal.SIGTERM, stop)
    gevent.signal_handler(signal.SIGINT, stop)
    try:
        server.start()
    except OSError as exc:
        raise SystemExit("chattle: cannot listen on %s:%s (%s); pick another --port"
                         % (settings.host, settings.port, exc.strerror or exc))
    get_bus()
    print("chattle: serving on http://%s:%d/ (bus: %s, pid %d)"
          % (settings.host, server.server_port, bus.name, os.getpid()), flush=True)
    say_if_degraded(bus)
    server.serve_forever()
    finish_bus_calls(settings.stop_timeout)
    if bus is not None:
        bus.close()


if __name__ == "__main__":
    serve(parse_args())
