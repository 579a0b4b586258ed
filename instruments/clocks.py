"""Clocks across hosts: how far a load process's wall clock is from each server's.

A wake-up latency is the arrival of an answer on the load host's clock minus the
message's `ts` on the clock that stamped it (Redis' TIME on the Redis bus). On one
machine both are one clock; across machines they differ by whatever NTP left, and a
few milliseconds of offset is as large as the latency itself. So each load process
measures, before its listeners start:

- its offset to every server, NTP-style: several GET /health round trips (the answer's
  "time" is read from the clock `ts` comes from); the one with the shortest round trip
  is kept, the offset is its midpoint minus the server's time, and its bound is half
  that round trip (the server read its clock somewhere inside it);
- the kernel's receive timestamps (SO_TIMESTAMPNS) against its own clock: on a real
  host they are one clock, but a process under faketime (the cluster test) sees a
  shifted wall clock while the kernel does not. The difference is measured once with
  one datagram on a socket pair, and `longpoll` adds it to every stamp.

No Locust import: the parts are tested without it.
"""

import json
import socket
import time

from instruments.stamps import ANCILLARY_SPACE, SO_TIMESTAMPNS, arrival

ROUNDS = 8                  # /health round trips per server; the tightest one is kept
SKEW_ROUNDS = 5             # datagrams for the kernel stamp clock; the tightest one is kept


class ClockOffset:
    """This process's wall clock minus a server's `ts` clock, within +- bound seconds."""

    __slots__ = ("url", "offset", "bound", "round_trips")

    def __init__(self, url, offset, bound, round_trips):
        self.url, self.offset, self.bound, self.round_trips = url, offset, bound, round_trips

    def to_dict(self):
        return {"url": self.url, "offset": self.offset, "bound": self.bound, "round_trips": self.round_trips}


def tightest(samples):
    """(offset, bound) of the (sent, server time, received) sample with the shortest round trip."""
    sent, server_time, received = min(samples, key=lambda sample: sample[2] - sample[0])
    return (sent + received) / 2.0 - server_time, (received - sent) / 2.0


def measure_offset(url, client, rounds=ROUNDS, clock=time.time):
    """ClockOffset of the server at `url`, over `client` (a LongPollClient on it; its first
    request also connects, which only widens that one round trip)."""
    samples = []
    for _ in range(rounds):
        sent = clock()
        reply = client.get("/health", name="clock (/health)")
        received = clock()
        server_time = json.loads(reply.body).get("time") if reply.status == 200 else None
        if not isinstance(server_time, (int, float)):
            raise OSError("%s/health gave no \"time\" (answered %d): it cannot be put on one clock with this "
                          "host; is it an older Chattle?" % (url, reply.status))
        samples.append((sent, server_time, received))
    offset, bound = tightest(samples)
    return ClockOffset(url, offset, bound, rounds)


def kernel_stamp_skew(rounds=SKEW_ROUNDS, clock=time.time):
    """(seconds to add to a kernel receive timestamp to put it on this process's clock, bound)."""
    samples = []
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        receiver.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        for _ in range(rounds):
            before = clock()
            sender.send(b".")
            _data, ancillary, _flags, _address = receiver.recvmsg(1, ANCILLARY_SPACE)
            after = clock()
            stamped = arrival(ancillary)
            if stamped is not None:
                samples.append((before, stamped, after))
    finally:
        sender.close()
        receiver.close()
    if not samples:
        return 0.0, None
    return tightest(samples)


class Clocks:
    """This process's offsets to every server, and the corrected latency of one delivery."""

    def __init__(self):
        self.by_url = {}
        self.kernel_skew = 0.0
        self.kernel_skew_bound = None
        self.timed_wait_early = None    # monotonic_wait_early(): 0.0 on a sound host
        self.preload = None             # clock_preload(): libfaketime's settings, when under it

    def measure(self, urls, client_for):
        for url in urls:
            client = client_for(url)
            try:
                self.by_url[url] = measure_offset(url, client)
            finally:
                client.close()

    def to_dict(self):
        return {"kernel_skew": self.kernel_skew, "kernel_skew_bound": self.kernel_skew_bound,
                "timed_wait_early": self.timed_wait_early, "preload": self.preload,
                "servers": [offset.to_dict() for offset in self.by_url.values()]}


# -- timed waits ------------------------------------------------------------------------

CLOCK_MONOTONIC = 1         # <time.h>, Linux
WAIT_PROBE_SECONDS = 0.02   # the probe's timed wait; an early return skips all of it
_PTHREAD_SPACE = 256        # bytes for a pthread_cond_t, pthread_condattr_t or pthread_mutex_t (glibc: 48, 4, 40)


def monotonic_wait_early(seconds=WAIT_PROBE_SECONDS):
    """Seconds before its deadline that a timed wait on a monotonic condition variable
    returned (0.0 when it kept the deadline, as POSIX requires), or None where it cannot
    be tried (no libc pthread functions).

    CPython's GIL hand-off is such a wait (5 ms, sys.getswitchinterval). libfaketime's
    "monotonic fix" (FAKETIME_FORCE_MONOTONIC_FIX, on by default with recent glibc)
    converts the deadline as a shifted wall-clock time, so the wait returns at once: a
    thread that wants the GIL spins on its mutex, and an answer a thread-pool thread saw
    arrive waits tens of milliseconds before it is read, which is the client's lag, not
    the server's. The symbols are looked up in the process's global scope, so a preloaded
    libfaketime is the one called, as it is for the interpreter's own waits."""
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        attr, cond, mutex = (ctypes.create_string_buffer(_PTHREAD_SPACE) for _ in range(3))
        if libc.pthread_condattr_init(attr) or libc.pthread_condattr_setclock(attr, CLOCK_MONOTONIC) \
                or libc.pthread_cond_init(cond, attr) or libc.pthread_mutex_init(mutex, None):
            return None
    except (OSError, AttributeError):
        return None

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    def monotonic_now():
        now = Timespec()
        libc.clock_gettime(CLOCK_MONOTONIC, ctypes.byref(now))
        return now.tv_sec + now.tv_nsec * 1e-9

    try:
        libc.pthread_mutex_lock(mutex)
        deadline_at = monotonic_now() + seconds
        deadline = Timespec(int(deadline_at), int(deadline_at % 1 * 1e9))
        for _ in range(3):      # a wait may also end spuriously; only its return at the deadline counts
            if libc.pthread_cond_timedwait(cond, mutex, ctypes.byref(deadline)) != 0:
                break
        returned_at = monotonic_now()
        libc.pthread_mutex_unlock(mutex)
    finally:
        libc.pthread_cond_destroy(cond)
        libc.pthread_mutex_destroy(mutex)
        libc.pthread_condattr_destroy(attr)
    return max(0.0, (deadline.tv_sec + deadline.tv_nsec * 1e-9) - returned_at)


def clock_preload():
    """libfaketime's settings when this process runs under it (its wall clock shifted), else
    None: the report names a load host whose clock is faked and how."""
    import os
    preload = os.environ.get("LD_PRELOAD", "")
    if "libfaketime" not in preload:
        return None
    return {"library": next(part for part in preload.replace(":", " ").split() if "libfaketime" in part),
            "spec": os.environ.get("FAKETIME"),
            "dont_fake_monotonic": os.environ.get("FAKETIME_DONT_FAKE_MONOTONIC") == "1",
            "force_monotonic_fix": os.environ.get("FAKETIME_FORCE_MONOTONIC_FIX")}
