"""The buses `make bench REDIS_CLUSTER=` compares under one rig and one worker count.

    memory          one worker, `python chattle.py` on its in-memory bus (the reference)
    Redis           gunicorn workers on one redis-server started for the run
    Redis Cluster   the same workers on a Redis Cluster: `local` starts one of 3 masters and
                    3 replicas for the run (harness/redis_cluster.py), or host:port[,...] of
                    one that runs already

Each bus names its Redis nodes, so a point reads their CPU around its fan-out through
`INFO cpu` (instruments.measures.redis_cpu_seconds): that also serves for a cluster this
process did not start and has no pid of.
"""

from harness.processes import LOOPBACK, RedisServer
from harness.redis_cluster import RedisCluster
from instruments.measures import redis_cpu_seconds

LOCAL = "local"
MEMORY, REDIS, CLUSTER = "memory", "Redis", "Redis Cluster"
NODE_TIMEOUT = 5.0  # seconds for one INFO or CLUSTER command
ROOM_CANDIDATES = 100  # names tried for a room on every master (3 masters: all are met within a handful)


def parse_addresses(text):
    """[(host, port)] of `host:port[,host:port...]`; ValueError that says what is expected."""
    addresses = []
    for item in (part.strip() for part in text.split(",")):
        host, _colon, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("REDIS_CLUSTER: %r is not host:port; give `local` or host:port[,host:port...] "
                             "of a cluster node" % item)
        addresses.append((host, int(port)))
    return addresses


def client(host, port):
    import redis  # the harness's virtualenv has it (the product's Redis client)

    return redis.Redis(host=host, port=port, socket_timeout=NODE_TIMEOUT, socket_connect_timeout=NODE_TIMEOUT)


def node_cpu_seconds(host, port):
    connection = client(host, port)
    try:
        return redis_cpu_seconds(connection.info("cpu"))
    finally:
        connection.close()


def cluster_nodes(seeds):
    """[(host, port)] of every connected node, masters and replicas, as the first seed that
    answers lists them in CLUSTER NODES (a replica's CPU is the cluster's too: it replicates
    every post)."""
    failures = []
    for host, port in seeds:
        connection = client(host, port)
        try:
            text = connection.execute_command("CLUSTER", "NODES")
        except Exception as error:  # refused, timed out, not a cluster node (redis.exceptions.*)
            failures.append("%s:%d: %s" % (host, port, error))
            continue
        finally:
            connection.close()
        return nodes_listed(text.decode() if isinstance(text, bytes) else text)
    raise RuntimeError("REDIS_CLUSTER: no cluster node answered CLUSTER NODES (%s); start one with "
                       "`make redis-cluster`, or give REDIS_CLUSTER=local" % "; ".join(failures))


def nodes_listed(text):
    """(host, port) of each node of a CLUSTER NODES reply that is connected and not failed."""
    nodes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8 or fields[7] != "connected" or "fail" in fields[2].split(",") or "noaddr" in fields[2]:
            continue
        host, _colon, port = fields[1].split("@")[0].rpartition(":")
        nodes.append((host, int(port)))
    return nodes


class Bus:
    """One bus of the comparison: how a server is started on it, and its Redis nodes."""

    def __init__(self, name, workers, env=None, nodes=(), rooms=None):
        """`env`: what the server is given to use the bus (none: its memory bus); `rooms`: the
        rooms the polls are spread over (None: the rig's one room)."""
        self.name, self.workers, self.env, self.nodes, self.rooms = name, workers, env or {}, nodes, rooms

    @property
    def label(self):
        return "%d worker%s, %s%s" % (self.workers, "" if self.workers == 1 else "s", self.name,
                                      ", %d rooms" % len(self.rooms) if self.rooms else "")

    def redis_cpu_seconds(self):
        """CPU seconds its Redis nodes have used so far, summed (None: the bus has none)."""
        if not self.nodes:
            return None
        return sum(node_cpu_seconds(host, port) for host, port in self.nodes)


class Buses:
    """The three buses and the Redis processes they need, started in the constructor and
    stopped by stop() (by pid, what this object started only), also when starting fails."""

    def __init__(self, cluster, workers=(2,), memory=True):
        """`cluster`: LOCAL or host:port[,...]; `workers`: the worker counts, each on both Redis buses."""
        self.single = self.cluster = None
        try:
            self.single = RedisServer(appendonly=False)  # as the plain sweep's shared redis-server
            if cluster == LOCAL:
                self.cluster = RedisCluster(appendonly=False)
                seeds = [(LOOPBACK, node.port) for node in self.cluster.nodes]
                address = self.cluster.addresses
            else:
                seeds = parse_addresses(cluster)
                address = cluster
            self.cluster_address = address
            single = [(LOOPBACK, self.single.port)]
            nodes = cluster_nodes(seeds)
            self.spread = self.room_per_master()
            self.all = [Bus(MEMORY, 1)] if memory else []
            for count in workers:
                for rooms in (None, list(self.spread)):
                    self.all += [Bus(REDIS, count, env={"CHATTLE_REDIS_URL": self.single.url}, nodes=single,
                                     rooms=rooms),
                                 Bus(CLUSTER, count, env={"CHATTLE_REDIS_CLUSTER": address}, nodes=nodes,
                                     rooms=rooms)]
        except BaseException:
            self.stop()
            raise

    def redis_cpu_seconds(self):
        """Every Redis node of the buses together, each once: what the rest of the machine is not."""
        return sum(node_cpu_seconds(host, port) for host, port in {node for bus in self.all for node in bus.nodes})

    def room_home(self, room):
        """'host:port (slot s)' of the master holding `room`'s keys on the cluster."""
        return self.homes([room])[room]

    def homes(self, rooms):
        """{room: 'host:port (slot s)' of the master holding its keys} (a room's keys share
        the hash tag {room}, so its slot is that of any of them)."""
        host, port = parse_addresses(self.cluster_address)[0]
        connection = client(host, port)
        try:
            ranges = connection.execute_command("CLUSTER", "SLOTS")
            found = {}
            for room in rooms:
                slot = connection.execute_command("CLUSTER", "KEYSLOT", "chattle:{%s}:last" % room)
                found[room] = "slot %d" % slot
                for start, end, master, *_replicas in ranges:
                    if start <= slot <= end:
                        master_host = master[0].decode() if isinstance(master[0], bytes) else master[0]
                        found[room] = "%s:%d (slot %d)" % (master_host, master[1], slot)
            return found
        finally:
            connection.close()

    def room_per_master(self):
        """{room: its master} of rooms bench-0, bench-1, ... until every master holds one."""
        homes = self.homes(["bench-%d" % number for number in range(ROOM_CANDIDATES)])
        chosen = {}
        for room, home in homes.items():
            master = home.split(" ")[0]
            if master not in {where.split(" ")[0] for where in chosen.values()}:
                chosen[room] = home
        return chosen

    def stop(self):
        if self.cluster is not None:
            self.cluster.stop()
        if self.single is not None:
            self.single.stop()
