"""A master of a Redis Cluster killed on purpose, and every loss counted: what the failover
tests (tests/server/test_redis_cluster.py) and `make load CHAOS=failover` (loadtests/run.py)
share.

Which master serves a room is asked of the cluster itself (CLUSTER KEYSLOT of the room's
hash tag, CLUSTER SLOTS), never of Chattle's bus: the room's keys are `chattle:{<room>}:...`
(docs/cluster.md), so a room lives in the slot of `{<room>}`.
"""

import time

from harness.processes import wait_until

PROMOTION_DEADLINE = 60.0   # seconds a replica has to be promoted: a bound, not a speed claim


# -- asking the cluster ---------------------------------------------------------------------------

def node_client(address, timeout=5.0):
    """A plain (non-cluster) client of one node, `host:port`."""
    import redis  # the harness's virtualenv has it
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    host, port = address.rsplit(":", 1)
    # no retries: a node that refuses is down now, and the caller says so at once
    return redis.Redis(host=host, port=int(port), socket_timeout=timeout, socket_connect_timeout=timeout,
                       retry=Retry(NoBackoff(), 0), decode_responses=True)


def ask(address, *words):
    client = node_client(address)
    try:
        return client.execute_command(*words)
    finally:
        client.close()


def room_slot(address, room):
    return int(ask(address, "CLUSTER", "KEYSLOT", "chattle:{%s}:last" % room))


def slot_table(address):
    """[{"slots": [[first, last]...], "master": host:port, "replicas": [host:port...]}], one entry
    per master, as `address` answers CLUSTER SLOTS."""
    shards = {}
    for entry in ask(address, "CLUSTER", "SLOTS"):
        first, last, master, *replicas = entry
        name = "%s:%d" % (master[0], master[1])
        shard = shards.setdefault(name, {"slots": [], "master": name, "replicas": []})
        shard["slots"].append([int(first), int(last)])
        for replica in replicas:
            replica_name = "%s:%d" % (replica[0], replica[1])
            if replica_name not in shard["replicas"]:
                shard["replicas"].append(replica_name)
    return sorted(shards.values(), key=lambda shard: shard["slots"][0][0])


def shard_of_slot(table, slot):
    return next((shard for shard in table if any(first <= slot <= last for first, last in shard["slots"])), None)


def node_cpu_seconds(address):
    """used_cpu_sys + used_cpu_user of one node (INFO cpu): what it spent since it started."""
    info = ask(address, "INFO", "cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


# -- the failover ---------------------------------------------------------------------------------

def fail_over(cluster, doomed, after_kill=None, restart=True):
    """SIGKILL `doomed` (a master the harness started: by its pid), wait until its replica
    says it is master (the cluster's node timeout, then an election), then start the old
    master again, as a supervisor would: it joins as the new master's replica.
    {"heir", "killed_at", "promoted_at", "restarted"} (monotonic times)."""
    heir = cluster.replica_of(doomed)
    if heir is None:
        raise RuntimeError("the master on port %d has no replica to promote" % doomed.port)
    killed_at = time.monotonic()
    doomed.signal(9)
    doomed.popen.wait(10)
    if after_kill is not None:
        after_kill()
    wait_until(lambda: heir.role() == "master", PROMOTION_DEADLINE, "the replica on port %d promoted" % heir.port)
    promoted_at = time.monotonic()
    restarted = cluster.restart(doomed) if restart else None
    return {"heir": heir, "killed_at": killed_at, "promoted_at": promoted_at, "restarted": restarted}


# -- judging --------------------------------------------------------------------------------------

def judge(acknowledged, delivered, signals):
    """(delivered, signalled, lost) of one listener: `acknowledged` is [(post, when its 201
    came)] of the posts it owes, `delivered(post)` whether it got that one, `signals` when it
    was told `reset` or `missed`. A post it did not get is signalled when the listener was
    told after the post was acknowledged, else lost (silently)."""
    counts = [0, 0, 0]
    for post, when in acknowledged:
        if delivered(post):
            counts[0] += 1
        elif any(signal >= when for signal in signals):
            counts[1] += 1
        else:
            counts[2] += 1
    return tuple(counts)


def without_service(events):
    """(first failure, first success after it, seconds between) of [(when, served)]: the
    time without service. (None, None, 0.0) when nothing failed; the success is None (and so
    the seconds) when none came after."""
    events = sorted(events)
    failed = next((when for when, served in events if not served), None)
    if failed is None:
        return None, None, 0.0
    back = next((when for when, served in events if served and when > failed), None)
    return failed, back, None if back is None else back - failed


def longest_silence(times):
    """The longest time between two successes: a room's time without service."""
    times = sorted(times)
    return max((later - earlier for earlier, later in zip(times, times[1:])), default=0.0)
