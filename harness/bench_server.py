"""Chattle with the harness's deliberate faults: the server the benchmarks start when a
CHATTLE_BENCH_* variable asks for one. The product carries none of this; it is installed
on chattle's own Bottle application (the extra work on its Room class) here, before
serving, so the path measured is chattle's with only the fault added.

    CHATTLE_BENCH_EXTRA_WORK=<squares>   every poll answer sums that many squares once made
                                         (how `make regress` shows its gates can fail)
    CHATTLE_BENCH_STAMP_EARLY_MS=<ms>    the in-memory bus stamps every message that much
                                         early: measured latency moves, nothing else
    CHATTLE_BENCH_LEAK=requests,sockets  every chat request is kept in a list / every
                                         20th opens a socket never closed (how `make soak`
                                         shows its gates can fail)
    CHATTLE_BENCH_TRACE=<directory>      tracemalloc on; SIGUSR2 dumps a snapshot there,
                                         named <pid>-<the word in <directory>/label>

    python harness/bench_server.py [chattle.py's flags]    # as `python chattle.py`
    gunicorn --pythonpath harness ... bench_server:app     # as `gunicorn chattle`

harness/processes.py starts servers through this file whenever such a variable is set.
It runs as a script or a gunicorn app from the harness directory, so it imports nothing
of the harness: the chattle it wraps is whichever one the interpreter finds (PYTHONPATH).
"""

import os
import socket
import sys
import time

import chattle  # patches the standard library with gevent first
import chattle_bus
import chattle_rooms

EXTRA_WORK_VARIABLE = "CHATTLE_BENCH_EXTRA_WORK"
LEAK_VARIABLE = "CHATTLE_BENCH_LEAK"
STAMP_EARLY_VARIABLE = "CHATTLE_BENCH_STAMP_EARLY_MS"
LEAKS = ("requests", "sockets")


###############################################################################
# Extra work per poll answer: a slowdown `make regress` must see
###############################################################################

class ExtraWorkPerAnswer:
    """Makes every poll answer sum `squares` squares once its body is made: a slowdown in
    the answer path of whichever process serves (this script, a gunicorn worker, a
    benchmark's in-process app). Work, not a time: under callgrind a timed spin would run
    fifty times fewer instructions.

    It wraps chattle_rooms.Room.answer, which a poll calls once it is woken (or at once when
    it need not wait), and not the poll route: a wrapper around the route stays on every
    parked poll's stack, and made memory per held poll 5-6 % larger as well, so a
    deliberate CPU slowdown also looked like a memory regression."""

    def __init__(self, squares):
        self.squares = squares
        self.answer = None

    def install(self, room_class):
        if self.answer is not None:
            return
        answer = self.answer = room_class.answer
        squares = self.squares

        def answer_with_extra_work(room, since, limit, shared=False, epoch=None):
            body = answer(room, since, limit, shared, epoch)
            sum(i * i for i in range(squares))
            return body

        room_class.answer = answer_with_extra_work

    def remove(self, room_class):
        if self.answer is not None:
            room_class.answer, self.answer = self.answer, None


def positive_setting(environ, variable, kind, what):
    """The variable's value as `kind` when it is set and above 0, else None; a value that is
    not one stops the server, naming it."""
    value = environ.get(variable, "")
    if not value:
        return None
    try:
        number = kind(value)
    except ValueError:
        raise SystemExit("chattle: %s=%r is not %s" % (variable, value, what))
    return number if number > 0 else None


def install_extra_work(environ=os.environ, room_class=None):
    squares = positive_setting(environ, EXTRA_WORK_VARIABLE, int, "a whole number of squares")
    if squares is None:
        return None
    extra_work = ExtraWorkPerAnswer(squares)
    extra_work.install(room_class or chattle_rooms.Room)
    return extra_work


###############################################################################
# Messages stamped early: a change of measured latency alone (make load-calibrate's)
###############################################################################

class _EarlyClock:
    """The time module as chattle_bus sees it, but time() `seconds` early."""

    def __init__(self, seconds):
        self.seconds = seconds

    def time(self):
        return time.time() - self.seconds

    def __getattr__(self, name):
        return getattr(time, name)


class StampEarly:
    """Stamps every message the in-memory bus accepts `seconds` before it was accepted:
    the wake-up latency a client measures (its arrival less the message's "ts") grows by
    exactly that, and nothing the server does changes (its CPU, its memory, how a burst's
    messages share an answer). A real delay does not do that here: a wake-up held back a
    few ms let a whole burst's posts into one answer, which cut CPU per delivery by half
    and the p50 with it. The bus's clock (/health's "time", which a client may use to
    measure the offset between the clocks) stays true."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.clock = None

    def install(self, bus_module):
        if self.clock is not None:
            return
        self.clock = bus_module.MemoryBus.clock
        bus_module.time = _EarlyClock(self.seconds)
        bus_module.MemoryBus.clock = lambda bus: time.time()

    def remove(self, bus_module):
        if self.clock is not None:
            bus_module.time = time
            bus_module.MemoryBus.clock, self.clock = self.clock, None


def install_stamp_early(environ=os.environ, bus_module=None):
    milliseconds = positive_setting(environ, STAMP_EARLY_VARIABLE, float, "a number of milliseconds")
    if milliseconds is None:
        return None
    early = StampEarly(milliseconds / 1000.0)
    early.install(bus_module or chattle_bus)
    return early


###############################################################################
# Leaks: what a soak must catch
###############################################################################

class LeakPerRequest:
    """A Bottle plugin that leaks on chat requests (polls and posts; not /stats or
    /health, so the leak follows the load and not the sampler): keeps a copy of every
    request's text fields in `kept` (about 1 KB each), or opens a socket in `sockets` on
    every SOCKET_EVERY-th request and never closes it (at one a request, a soak's load
    took the 20 000 descriptors a process may have within a minute)."""

    name = "leak_per_request"
    api = 2
    SOCKET_EVERY = 20

    def __init__(self, leaks):
        self.leaks = set(leaks)
        self.kept = []
        self.sockets = []
        self.requests = 0

    def apply(self, callback, route):
        if callback not in (chattle.poll_messages, chattle.post_message):
            return callback
        keep_requests = "requests" in self.leaks
        open_sockets = "sockets" in self.leaks

        def leaking(*args, **kwargs):
            if keep_requests:
                self.kept.append({k: v for k, v in chattle.request.environ.items() if isinstance(v, str)})
            self.requests += 1
            if open_sockets and self.requests % self.SOCKET_EVERY == 0:
                self.sockets.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            return callback(*args, **kwargs)

        return leaking


def install_leaks(environ=os.environ, app=None):
    value = environ.get(LEAK_VARIABLE, "")
    leaks = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(leaks) - set(LEAKS))
    if unknown:
        raise SystemExit("chattle: %s=%r: no such leak %s; choose from %s"
                         % (LEAK_VARIABLE, value, ", ".join(unknown), ", ".join(LEAKS)))
    if leaks:
        plugin = LeakPerRequest(leaks)
        (app or chattle.app).install(plugin)
        return plugin
    return None


###############################################################################
# tracemalloc snapshots on request: where a soak's growth was allocated
###############################################################################

TRACE_VARIABLE = "CHATTLE_BENCH_TRACE"
TRACE_FRAMES = 8


def install_trace(environ=os.environ):
    trace_dir = environ.get(TRACE_VARIABLE, "")
    if not trace_dir:
        return
    import signal
    import tracemalloc

    import gevent

    tracemalloc.start(TRACE_FRAMES)

    def dump():
        with open(os.path.join(trace_dir, "label")) as label:
            name = "%d-%s.snapshot" % (os.getpid(), label.read().strip())
        tracemalloc.take_snapshot().dump(os.path.join(trace_dir, name + ".tmp"))
        os.replace(os.path.join(trace_dir, name + ".tmp"), os.path.join(trace_dir, name))

    gevent.signal_handler(signal.SIGUSR2, dump)


def install(environ=os.environ, app=None):
    """Every fault the environment asks for: the extra work on chattle's Room, the leaks on its
    application (or `app`), the tracing on the process."""
    install_extra_work(environ)
    install_stamp_early(environ)
    install_leaks(environ, app)
    install_trace(environ)


install()
# gunicorn's app: chattle's own entry point (the bound method, as chattle.application is),
# its routes now carrying the faults.
app = application = chattle.app.wsgi


if __name__ == "__main__":
    chattle.serve(chattle.parse_args(sys.argv[1:]))
