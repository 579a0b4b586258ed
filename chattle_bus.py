"""The bus: how a post reaches every worker's rooms. `Bus` names everything the app and
the rooms ask of one; `MemoryBus` is the bus of one process. The shared buses, on Redis
(chattle_redis.py) and on a Redis Cluster (chattle_cluster.py), keep one history for
every worker and host.
"""

import itertools
import os
import sys
import time
from collections import OrderedDict

from chattle_rooms import encode


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


class Bus:
    """What the app (chattle.py) and the rooms ask of a bus: every bus subclasses it and
    defines each method that raises NotImplementedError here. A bus is made once per serving
    process, on first use (after gunicorn forks), and is given that process's Rooms: it adds
    every post to the room it names there, which wakes the polls held on it.

    Its calls may raise BusUnavailable (answered 503: the shared bus cannot be reached) and
    RoomsFull (503: no room can be made now)."""

    name = None  # what /health and /stats call it: "memory", "redis", "redis-cluster"
    # Posts the bus's readers were given, and of those the ones for a room this worker does
    # not hold (/stats): a reader's cost. Always 0 where the post is the wake-up.
    posts_received = posts_received_for_rooms_not_held = 0

    def publish(self, room_name, sender, content, idempotency_key=None):
        """Post a message: the dict the protocol answers (id, ts, epoch; "replayed": True
        when a post under the same Idempotency-Key was accepted before, whose values these are)."""
        raise NotImplementedError

    def room(self, room_name, since=None, epoch=None):
        """The Room a poll after `since` of history `epoch` is answered from (a shared bus may
        load it first, or catch it up)."""
        raise NotImplementedError

    def forget(self, room_name):
        """The worker let the room go (Rooms.on_forget, or a poll on a room nobody uses): stop
        keeping its copy current."""
        raise NotImplementedError

    def health(self):
        """(ok, why not): what /health answers."""
        raise NotImplementedError

    def healthy(self):
        return self.health()[0]

    def reader_state(self):
        """What /health and /stats say of the reader that brings other workers' posts (a
        dict), or None for a bus with none."""
        raise NotImplementedError

    def clock(self):
        """The clock every `ts` of this bus is read from (seconds since the epoch)."""
        raise NotImplementedError

    def reader_lag(self):
        """Seconds the oldest post the reader has not applied yet has waited for it (0 when it
        is through), or None: no reader, or none that can tell now."""
        return None

    def close(self):
        """Let go of connections and greenlets; the bus is not used after."""
        raise NotImplementedError


class MemoryBus(Bus):
    """One process, no setup: the post is the wake-up."""

    name = "memory"

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
        return self.rooms.get(room_name)

    def forget(self, room_name):
        pass

    def health(self):
        return True, None

    def reader_state(self):
        return None  # no reader

    def clock(self):
        return time.time()

    def close(self):
        pass
