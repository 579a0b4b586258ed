"""A local Redis Cluster: 3 masters and 3 replicas on loopback ports, in a temp directory.

    python -m harness.redis_cluster            # `make redis-cluster`: runs until Ctrl-C

Each node is a `redis-server --cluster-enabled yes` started as a harness Process (so it is
stopped by its pid only); `redis-cli --cluster create` joins them, and the cluster is
ready when every node's `cluster info` says `cluster_state:ok`.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from harness import system_packages
from harness.processes import LOOPBACK, CleanUp, Process, free_port, wait_until


def command(port, *words, timeout=2.0):
    """One command to a node on loopback, its reply as text (RESP, undecoded)."""
    payload = b"*%d\r\n" % len(words) + b"".join(
        b"$%d\r\n%s\r\n" % (len(word.encode()), word.encode()) for word in words)
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as conn:
        conn.sendall(payload)
        reply = b""
        while True:
            chunk = conn.recv(65536)
            reply += chunk
            if not chunk or _complete(reply):
                return reply.decode("utf-8", "replace")


def cluster_port(attempts=200):
    """A free loopback port whose cluster bus port (10000 above it) is free too."""
    for _ in range(attempts):
        port = free_port()
        if port > 55535:
            continue
        try:
            with socket.socket() as probe:
                probe.bind((LOOPBACK, port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free loopback port pair (p, p + 10000) under 55536 for a cluster node")


def _complete(reply):
    if reply[:1] in (b"+", b"-", b":"):
        return reply.endswith(b"\r\n")
    if reply[:1] == b"$":
        header, _, rest = reply.partition(b"\r\n")
        return len(rest) >= int(header[1:]) + 2 if int(header[1:]) >= 0 else True
    return reply.endswith(b"\r\n")


class ClusterNode(Process):
    """One redis-server of the cluster, its data and nodes.conf in its own directory."""

    def __init__(self, workdir, port=None, appendonly=True, node_timeout_ms=2000):
        exe = system_packages.find("redis-server")
        if exe is None:
            raise system_packages.MissingProgram(["redis-server"])
        self.port = port or cluster_port()
        self.workdir = os.path.join(workdir, str(self.port))
        os.makedirs(self.workdir, exist_ok=True)
        argv = [exe, "--port", str(self.port), "--bind", LOOPBACK, "--dir", self.workdir,
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                # a master down for good stops its own slots only, not the whole cluster
                "--cluster-require-full-coverage", "no",
                # a replica that is not in sync answers an error, not old data
                "--replica-serve-stale-data", "no",
                # a replica's first sync starts at once, not after the default 5 s wait for
                # more replicas to share it; and it is listed to clients once its offset
                # moved: ping it every second (the default is 10 s)
                "--repl-diskless-sync-delay", "0",
                "--repl-ping-replica-period", "1",
                "--save", "", "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
                "--protected-mode", "yes", "--maxclients", "10000"]
        super().__init__(argv, cwd=self.workdir, log_path=os.path.join(self.workdir, "redis.log"))
        wait_until(self.ping, 10, "cluster node on port %d" % self.port, self)

    def ping(self):
        return command(self.port, "PING", timeout=1).startswith("+PONG")

    def info(self):
        """`cluster info` as a dict."""
        text = command(self.port, "CLUSTER", "INFO")
        return dict(line.split(":", 1) for line in text.splitlines()[1:] if ":" in line)

    def replicas_online(self):
        text = command(self.port, "INFO", "replication")
        return sum(1 for line in text.splitlines() if line.startswith("slave") and "state=online" in line)

    def listed_replicas(self):
        """The fewest replicas CLUSTER SLOTS lists for a slot range, as this node answers it."""
        import redis  # the harness's virtualenv has it; only the cluster's own checks use it

        client = redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=2)
        try:
            ranges = client.execute_command("CLUSTER SLOTS")
        finally:
            client.close()
        return min((len(entry) - 3 for entry in ranges), default=0)

    def role(self):
        """'master' or 'slave', as the node says of itself."""
        reply = command(self.port, "ROLE")
        return "master" if "master" in reply.split("\r\n", 3)[2] else "slave"


class RedisCluster:
    """Six nodes joined into one cluster: 3 masters, each with one replica."""

    def __init__(self, masters=3, replicas=1, workdir=None, node_timeout_ms=2000, appendonly=True):
        server = system_packages.find("redis-server")
        if server is None:
            raise system_packages.MissingProgram(["redis-server"])
        # redis-cli comes with redis-server (Debian's redis-tools, a dependency of it)
        cli = shutil.which("redis-cli", path=os.path.dirname(server)) or shutil.which("redis-cli")
        if cli is None:
            raise system_packages.MissingProgram(["redis-server"])
        self.workdir = workdir or tempfile.mkdtemp(prefix="chattle-redis-cluster-")
        self.nodes = []
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        try:
            for _ in range(masters * (1 + replicas)):
                self.nodes.append(ClusterNode(self.workdir, node_timeout_ms=node_timeout_ms,
                                              appendonly=appendonly))
            created = subprocess.run(
                [cli, "--cluster", "create", *("%s:%d" % (LOOPBACK, node.port) for node in self.nodes),
                 "--cluster-replicas", str(replicas), "--cluster-yes"],
                capture_output=True, text=True, timeout=60)
            if created.returncode != 0:
                raise RuntimeError("redis-cli --cluster create failed:\n%s%s" % (created.stdout, created.stderr))
            wait_until(self.ok, 60, "redis cluster state ok")
        except BaseException:
            self.stop()
            raise

    @property
    def addresses(self):
        """host:port of every node, comma-separated: what --redis-cluster takes."""
        return ",".join("%s:%d" % (LOOPBACK, node.port) for node in self.nodes)

    @property
    def seed(self):
        return "%s:%d" % (LOOPBACK, self.nodes[0].port)

    def ok(self):
        """Every live node says the cluster is ok and knows every node, and every master
        has its replicas online (a post that waits for one would wait in vain before)."""
        live = [node for node in self.nodes if node.alive()]
        for node in live:
            info = node.info()
            if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) < len(self.nodes):
                return False
        masters = [node for node in live if node.role() == "master"]
        # CLUSTER SLOTS (what clients go by) lists a replica only once the cluster has
        # heard of its replication offset: until then a client would see no replica
        return all(node.replicas_online() >= self.replicas for node in masters) and all(
            node.listed_replicas() >= self.replicas for node in masters)

    def node_serving(self, port):
        return next(node for node in self.nodes if node.port == port)

    def replica_of(self, master):
        """The node replicating `master` (as `master` itself says in CLUSTER NODES)."""
        master_id = command(master.port, "CLUSTER", "MYID").split("\r\n")[1]
        for line in command(master.port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if len(fields) > 3 and fields[3] == master_id:
                port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                return next(node for node in self.nodes if node.port == port)
        return None

    def restart(self, node):
        """Start a stopped node again on its port and directory: it rejoins the cluster (as
        a replica when its master was failed over meanwhile)."""
        node.stop()
        again = ClusterNode(os.path.dirname(node.workdir), port=node.port, node_timeout_ms=self.node_timeout_ms)
        self.nodes[self.nodes.index(node)] = again
        return again

    def masters(self):
        return [node for node in self.nodes if node.alive() and node.role() == "master"]

    def stop(self):
        for node in self.nodes:
            node.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masters", type=int, default=3, help="masters (default %(default)s)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas per master (default %(default)s)")
    args = parser.parse_args(argv)
    with CleanUp.armed():  # a SIGTERM takes Ctrl-C's way: the nodes are stopped
        cluster = RedisCluster(args.masters, args.replicas)
        print("redis-cluster: %d nodes ok, data in %s" % (len(cluster.nodes), cluster.workdir))
        print("redis-cluster: make run WORKERS=2 REDIS_CLUSTER=%s   (Ctrl-C stops the cluster)" % cluster.seed)
        sys.stdout.flush()
        try:
            while all(node.alive() for node in cluster.nodes):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
