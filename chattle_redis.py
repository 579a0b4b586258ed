"""The shared bus on one Redis: every room's history in a Redis Stream, and one reader per
worker following every post (RedisBus). The Lua both shared buses' post scripts are built
from is here too.
"""

import re
import time
import traceback

import gevent
from gevent.event import AsyncResult, Event

from chattle_bus import Bus, BusUnavailable, bus_log, never_sent
from chattle_rooms import RoomsFull, encode

# The start of both buses' post scripts: the room's next id (KEYS[1] is its last id) and the
# post's `ts` from Redis' own clock, so every worker stamps with the same one.
ID_AND_TS_LUA = """
local id = redis.call('INCR', KEYS[1])
local now = redis.call('TIME')
local ts = now[1] .. '.' .. string.format('%06d', tonumber(now[2]))
"""

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


def redis_url_problem(url):
    """Why redis-py cannot use `url`, in its own words, or None: asked at start, so that a
    mistyped --redis stops the server with one line instead of a traceback at the first post."""
    from redis.connection import parse_url

    try:
        parse_url(url)
    except ValueError as error:
        return str(error)
    return None


class RedisBus(Bus):
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
""" + ROOMS_BOUND_SCRIPT % {"rooms": "KEYS[5]", "ttl": "ARGV[6]", "bound": "ARGV[7]"} + ID_AND_TS_LUA \
        + EPOCH_LUA.replace("EPOCH_KEY", "KEYS[4]").replace("STREAM_KEY", "KEYS[2]") + """
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
            room.pin(1)
            try:
                state.wait()
            finally:
                room.pin(-1)
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
            room.pin(1)  # as for a load: not let go under the polls waiting for it
            try:
                pending.wait()
            finally:
                room.pin(-1)
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

    def reader_lag(self):
        """Redis's clock less the time in the id (Redis's milliseconds) of the first entry of
        the global stream after the one the reader applied last: one round trip to Redis."""
        seen = self.seen
        if not self.reader_ok or seen is None:
            return None
        try:
            ask = self.client.pipeline(transaction=False)
            ask.time()
            ask.xrange(self.POSTS, "(" + seen, "+", count=1)
            (seconds, microseconds), pending = ask.execute()
        except self.redis.RedisError:
            return None
        if not pending:
            return 0.0
        return max(0.0, seconds + microseconds / 1e6 - int(pending[0][0].split("-")[0]) / 1000.0)

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
