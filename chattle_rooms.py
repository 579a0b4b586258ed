"""The rooms of one worker: each room's bounded history and the Events its held polls
wait on (Room, Wakeup), and every room the worker knows with the worker's bounds on them
(Rooms). The bus adds posts here; the app answers polls from here.
"""

import json
import math
import time
from bisect import bisect_left
from collections import OrderedDict, deque

import gevent
from gevent.event import Event
from greenlet import getcurrent

import chattle_http


def encode(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


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
        """Wake every poll parked now; whether any was. Polls that park after this get fresh
        Events, so a woken poll never finds a set Event to spin on."""
        by_tick, self.by_tick = self.by_tick, {}
        for event, timer in by_tick.values():
            timer.close()
            event.set()
        return bool(by_tick)


# What Room.wait_for_news returns when the client of the poll left while it was held.
CLIENT_LEFT = object()


class Room:
    """One room's retained messages, and the two verbs: add a message, wait for one.

    Each message is kept as (id, its JSON encoding), encoded once when it arrives,
    so a fan-out to N waiters on one cursor joins the fragments once and sends the
    same bytes N times.
    """

    __slots__ = ("name", "messages", "last_id", "epoch", "restarts", "waiting", "_wakeup", "_answers",
                 "_name_json", "registry", "retained_bytes", "cached_bytes", "pinned")

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
        self.waiting = 0  # polls held on this room now, and the requests pinning it (pin)
        self.pinned = 0   # of those, requests waiting for the bus to load the room, not held polls
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
        # Polls a post before this one woke, and that have not run since (the bus's reader
        # adds a batch without yielding), are still counted in `waiting`, but parked on no Event.
        if self._wakeup.set() and self.waiting != self.pinned:
            self.registry.fan_out_started(self.waiting - self.pinned)

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

    def pin(self, change):
        """A request waits (change 1), or no longer (-1), for the bus to load or catch up this
        room: counted as waiting, so that the room is not let go under it (Rooms.release)."""
        self.waiting += change
        self.pinned += change

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

    # Rooms bounds what every room caches: it decides, these keep.
    def cache_answer(self, key, body):
        self._answers[key] = body
        self.cached_bytes += len(body)

    def answers_cached(self):
        return len(self._answers)

    def drop_answers(self):
        """Forget every cached answer; the bytes they held."""
        self._answers.clear()
        freed, self.cached_bytes = self.cached_bytes, 0
        return freed

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


class FanOutTimes:
    """How long fan-outs took, in fixed buckets (seconds, Prometheus's `le`: at most): a
    histogram of constant size, read by /stats and /metrics."""

    __slots__ = ("counts", "total_seconds")

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self):
        self.counts = [0] * (len(self.BUCKETS) + 1)  # the last: above every bucket
        self.total_seconds = 0.0

    def record(self, seconds):
        self.counts[bisect_left(self.BUCKETS, seconds)] += 1
        self.total_seconds += seconds

    def figures(self):
        """{"buckets": [[upper bound, fan-outs that took at most that], ...] (cumulative, as
        Prometheus counts them), "count": every fan-out, "sum": their seconds}."""
        buckets, within = [], 0
        for bound, count in zip(self.BUCKETS, self.counts):
            within += count
            buckets.append([bound, within])
        return {"buckets": buckets, "count": within + self.counts[-1], "sum": self.total_seconds}


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
        self.deliveries = 0   # polls a post woke: those held on its room when it arrived
        self.fan_out_times = FanOutTimes()
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

    # -- fan-outs -------------------------------------------------------------------
    def fan_out_started(self, woken):
        """A post woke `woken` held polls: count them, and time the fan-out, once for all of
        them. The Events the post set queued their notifiers on the event loop's callbacks,
        each of which runs its woken polls until they have sent their answers; a callback
        queued after them runs once every one has. Nothing is added per woken poll."""
        self.deliveries += woken
        gevent.get_hub().loop.run_callback(self._fan_out_ended, time.perf_counter())

    def _fan_out_ended(self, started):
        self.fan_out_times.record(time.perf_counter() - started)

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
    # made by MemoryBus.publish, less their messages' own cost (tests/server/test_bounds.py measures
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
        if room.cached_bytes + size > self.room_cache_bytes or room.answers_cached() >= room.ANSWER_CACHE_SIZE:
            self.drop_answers(room)
        while self.cached_bytes + size > self.answer_cache_bytes and self.caching:
            self.drop_answers(next(iter(self.caching)))
        room.cache_answer(key, body)
        self.cached_bytes += size
        self.caching[room] = None
        self.caching.move_to_end(room)

    def drop_answers(self, room):
        freed = room.drop_answers()
        if freed:
            self.cached_bytes -= freed
            del self.caching[room]

    def close(self):
        """Answer every held poll now, so a graceful stop is not held up by long-polls."""
        self.closing = True
        for room in list(self.by_name.values()):
            room.wake_all()


class RoomsFull(Exception):
    """A new room refused: the bound on rooms is reached and none can be forgotten. Answered
    503 with Retry-After, as the protocol answers a post that was not accepted."""

    def __init__(self, message, retry_after=1):
        super().__init__(message + "; nothing was written")
        self.retry_after = retry_after
