"""The shared bus on a Redis Cluster (RedisClusterBus): each room on one master, and each
worker subscribed only to the rooms it holds, one connection per master (ShardReader).
"""

import json
import traceback
from binascii import crc_hqx  # Redis Cluster's key hash, CRC16/XMODEM
from collections import deque

import gevent
from gevent.event import Event

from chattle_bus import BusUnavailable, bus_log, never_sent
from chattle_redis import EPOCH_LUA, ID_AND_TS_LUA, ROOMS_BOUND_SCRIPT, RedisBus
from chattle_rooms import RoomsFull, encode


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
""" + ROOMS_BOUND_SCRIPT % {"rooms": "KEYS[4]", "ttl": "ARGV[5]", "bound": "ARGV[8]"} + ID_AND_TS_LUA \
        + EPOCH_LUA.replace("EPOCH_KEY", "KEYS[3]").replace("STREAM_KEY", "KEYS[2]") + """
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
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
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

    def slot_moved(self, redirect):
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
                self.slot_moved(posted)
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
    def receive_shard_message(self, payload):
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

    def fetch_again(self, room_name):
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

    def reader_lag(self):
        """None: each master has its own shard reader, and no one figure says how far behind
        they are (/stats gives each shard's state)."""
        return None

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
    again (the bus's fetch_again): what was published meanwhile went to nobody."""

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
            self.bus.receive_shard_message(reply[2])
        elif kind == "ssubscribe":
            room_name = self.room_of(channel)
            confirmed = self.rooms.get(room_name)
            if confirmed is not None:
                confirmed.set()
                if room_name in self.refetch:
                    self.refetch.discard(room_name)
                    self.bus.fetch_again(room_name)
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
        self.bus.slot_moved(moved)

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
