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

    def measure(self, urls, client_for):
        for url in urls:
            client = client_for(url)
            try:
                self.by_url[url] = measure_offset(url, client)
            finally:
                client.close()

    def to_dict(self):
        return {"kernel_skew": self.kernel_skew, "kernel_skew_bound": self.kernel_skew_bound,
                "servers": [offset.to_dict() for offset in self.by_url.values()]}
