"""The kernel's receive timestamp of a socket read (SO_TIMESTAMPNS): when an answer's last
segment reached this host, whatever the reader was doing then.

Both instruments end the wake-up latency there (instruments/measures.py wakeup_latency): the
load test's held polls (loadtests/longpoll.py) and the bench rig (bench/rig.py). Timed
at the read instead, the rig's figures took in its own queue of unread answers.
"""

import socket
import struct

# Linux's SO_TIMESTAMPNS (also the SCM type of the control message); Python's socket
# module does not name it.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESPEC = struct.Struct("@qq")
ANCILLARY_SPACE = socket.CMSG_SPACE(TIMESPEC.size)


def stamp_seconds(value, shift=0.0):
    """The wall-clock time in one SO_TIMESTAMPNS control message, plus `shift` (a process
    whose clock is not the kernel's: instruments/clocks.py)."""
    seconds, nanoseconds = TIMESPEC.unpack_from(value)
    return seconds + nanoseconds * 1e-9 + shift


def arrival(ancillary, shift=0.0):
    """The kernel's arrival time among recvmsg()'s control messages, or None."""
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            return stamp_seconds(value, shift)
    return None
