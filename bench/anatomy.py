"""What one held poll is made of: a map for memory work.

Runs chattle's app under gevent pywsgi in this process with tracemalloc on, parks N
polls from a separate client process (the rig's --hold-only mode), and compares
snapshots taken idle and holding: the top allocation sites per held poll, the
greenlets per poll and the C stack each one has saved, the RSS that tracemalloc does
not see, and the kernel's socket memory (not in any process's RSS).

    python -m bench.anatomy [--polls 2000]
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import gevent  # noqa: E402
import greenlet  # noqa: E402
from gevent import subprocess  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import chattle  # noqa: E402
from chattle_limits import raise_descriptor_limit  # noqa: E402
from harness.processes import LOOPBACK  # noqa: E402
from instruments.held_poll_parts import PARTS  # noqa: E402
from instruments.measures import memory_per_connection, summed_rss  # noqa: E402


def kernel_tcp_bytes():
    """Kernel memory of all TCP sockets (/proc/net/sockstat 'mem', in pages)."""
    try:
        with open("/proc/net/sockstat") as stat:
            for line in stat:
                if line.startswith("TCP:"):
                    fields = line.split()
                    return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        pass
    return 0


def socket_buffer_sizes():
    """SO_RCVBUF/SO_SNDBUF of a freshly accepted loopback socket, as the server gets them."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    sizes = (accepted.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
             accepted.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
    for sock in (accepted, client, listener):
        sock.close()
    return sizes


def anonymous_memory():
    """(Size, Rss) in bytes summed over this process's anonymous mappings (/proc/self/smaps)."""
    size = rss = 0
    anonymous = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                anonymous = len(fields) < 6  # a mapping line without a path
            elif anonymous and fields[0] == "Size:":
                size += int(fields[1]) * 1024
            elif anonymous and fields[0] == "Rss:":
                rss += int(fields[1]) * 1024
    return size, rss


def _park_in_python():
    greenlet.getcurrent().parent.switch()


def data_stack_cost(count=5000):
    """What a greenlet that has run Python code costs beyond one that has not, per greenlet:
    {"rss", "mapped", "traced", "saved_stack"} differences. On CPython 3.11 and later greenlet
    starts every greenlet on a data stack of its own (the interpreter's frames), whose first
    chunk the interpreter maps with the object arena allocator (16 KiB, DATA_STACK_CHUNK_SIZE):
    a mapping of 16 KiB with the page it writes resident, which tracemalloc does not see.
    Both sets park at once, so the difference is the data stack and the one eval-loop entry."""
    def park_many(run):
        gc.collect()
        tracemalloc.start(1)
        traced_before = tracemalloc.get_traced_memory()[0]
        mapped_before, rss_before = anonymous_memory()
        parked = []
        for _ in range(count):
            parked.append(greenlet.greenlet(run))
            parked[-1].switch()
        mapped_after, rss_after = anonymous_memory()
        traced = tracemalloc.get_traced_memory()[0] - traced_before
        tracemalloc.stop()
        figures = {"rss": (rss_after - rss_before) / count, "mapped": (mapped_after - mapped_before) / count,
                   "traced": traced / count, "saved_stack": sum(g._stack_saved for g in parked) / count}
        for parked_greenlet in parked:
            parked_greenlet.throw(greenlet.GreenletExit)
        return figures

    without_python = park_many(greenlet.getcurrent().switch)  # run is C: no Python frame is ever pushed
    with_python = park_many(_park_in_python)
    return {name: with_python[name] - without_python[name] for name in with_python}


def park_line():
    """chattle_rooms.py:<line> of the switch a held poll parks at."""
    import inspect

    import chattle_rooms

    lines, first = inspect.getsourcelines(chattle_rooms.Room.wait_for_news)
    for offset, line in enumerate(lines):
        if ".switch()" in line and "woken_by" in line:
            return "chattle_rooms.py:%d" % (first + offset)
    raise RuntimeError("the park's switch is not in Room.wait_for_news any more: update bench/anatomy.py")


def chattle_http_lines():
    """The lines of chattle_http.py that make a connection's reader and its request body."""
    import inspect

    import chattle_http

    found = {}
    for name, function, marker in (("READER", chattle_http.ChattleHandling.__init__, "RequestReader("),
                                   ("INPUT", chattle_http.ChattleHandling.get_environ, "pywsgi.Input(")):
        lines, first = inspect.getsourcelines(function)
        for offset, line in enumerate(lines):
            if marker in line:
                found[name] = "chattle_http.py:%d" % (first + offset)
    return found


def breakdown(sites):
    """{part: traced bytes per held poll} of PARTS, from every site's bytes per poll."""
    aliases = dict(chattle_http_lines(), PARK=park_line())
    patterns = [(part, [aliases.get(p.split(":")[-1], p) if ":" in p else p for p in files]) for part, files in PARTS]
    parts = {part: 0.0 for part, _files in PARTS}
    parts["other"] = 0.0
    for site in sites:
        for part, files in patterns:
            if any(site["site"] == f if ":" in f else site["site"].split(":")[0].endswith(f) for f in files):
                parts[part] += site["bytes_per_poll"]
                break
        else:
            parts["other"] += site["bytes_per_poll"]
    return parts


def live_greenlets():
    return [obj for obj in gc.get_objects() if isinstance(obj, greenlet.greenlet)]


def measure(polls=2000, top=15):
    chattle.configure(chattle.Settings())
    raise_descriptor_limit()
    server = chattle.make_server(LOOPBACK, 0)
    server.start()
    url = "http://%s:%d" % (LOOPBACK, server.server_port)
    room = chattle.rooms.get("anatomy")
    chattle.get_bus().publish("anatomy", "anatomy", "warm-up")
    client = None
    try:
        # Warm every code path once (routing, a held poll, an answer) before the idle snapshot.
        warm = subprocess.Popen([sys.executable, "-m", "bench.rig", "--park", "20", "--url", url, "--room",
                                 "anatomy", "--cursor", str(room.last_id)], cwd=ROOT,
                                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        warm.stdout.readline()
        deadline = time.monotonic() + 30
        while chattle.rooms.waiters < 20 and time.monotonic() < deadline:
            gevent.sleep(0.05)
        chattle.get_bus().publish("anatomy", "anatomy", "warm")
        warm.communicate(timeout=60)

        gc.collect()
        tracemalloc.start(1)
        idle_snapshot = tracemalloc.take_snapshot()
        idle_rss = summed_rss([os.getpid()])
        idle_kernel = kernel_tcp_bytes()
        idle_greenlets = len(live_greenlets())

        client = subprocess.Popen([sys.executable, "-m", "bench.rig", "--park", str(polls), "--url", url,
                                   "--room", "anatomy", "--cursor", str(room.last_id), "--hold-only"],
                                  cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
        parked = json.loads(client.stdout.readline())["parked"]
        deadline = time.monotonic() + 60
        while chattle.rooms.waiters < parked and time.monotonic() < deadline:
            gevent.sleep(0.05)
        held = chattle.rooms.waiters
        gevent.sleep(0.3)
        gc.collect()
        holding_snapshot = tracemalloc.take_snapshot()
        holding_rss = summed_rss([os.getpid()])
        holding_kernel = kernel_tcp_bytes()
        greenlets = live_greenlets()
        saved_stack = sum(getattr(g, "_stack_saved", 0) or 0 for g in greenlets)
        holding_greenlets = len(greenlets)
        del greenlets
        tracemalloc.stop()
    finally:
        if client is not None:
            client.stdin.write("go\n")
            client.stdin.close()
            client.wait(30)
        chattle.rooms.close()
        server.stop(timeout=5)
        chattle.configure(chattle.Settings())

    held = max(held, 1)
    stats = holding_snapshot.compare_to(idle_snapshot, "lineno")
    traced_delta = sum(stat.size_diff for stat in stats)
    rcvbuf, sndbuf = socket_buffer_sizes()
    sites = []
    for stat in sorted(stats, key=lambda s: -s.size_diff):
        frame = stat.traceback[0]
        sites.append({"site": "%s:%d" % (os.path.relpath(frame.filename, ROOT) if frame.filename.startswith(ROOT)
                                         else shorten(frame.filename), frame.lineno),
                      "bytes_per_poll": stat.size_diff / held, "count": stat.count_diff})
    rss_per_poll = memory_per_connection(idle_rss, holding_rss, held)
    return {
        "held": held,
        "rss_per_poll": rss_per_poll,
        "traced_per_poll": traced_delta / held,
        "untraced_per_poll": rss_per_poll - traced_delta / held,
        "greenlets_per_poll": (holding_greenlets - idle_greenlets) / held,
        "saved_stack_per_poll": saved_stack / held,
        "stack_note": "%.0f B saved C stack" % (saved_stack / held),
        "so_rcvbuf": rcvbuf,
        "so_sndbuf": sndbuf,
        # Both ends of each connection live in this kernel: halve for the server's share.
        "kernel_tcp_per_poll": (holding_kernel - idle_kernel) / held / 2,
        "top_sites": sites[:top],
        "parts": breakdown(sites),
        "data_stack": data_stack_cost(),
    }


def shorten(path):
    marker = "site-packages" + os.sep
    return path.split(marker, 1)[1] if marker in path else os.path.basename(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Allocation map of one held poll (tracemalloc, in-process)")
    parser.add_argument("--polls", type=int, default=2000, help="held polls to divide by (default %(default)s)")
    parser.add_argument("--top", type=int, default=15, help="allocation sites to list (default %(default)s)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    result = measure(args.polls, args.top)
    print("held polls: %d" % result["held"])
    for key in ("rss_per_poll", "traced_per_poll", "untraced_per_poll", "saved_stack_per_poll",
                "kernel_tcp_per_poll"):
        print("%-22s %8.0f B" % (key, result[key]))
    print("greenlets per poll: %.2f; SO_RCVBUF %d B, SO_SNDBUF %d B (kernel, reserved lazily)"
          % (result["greenlets_per_poll"], result["so_rcvbuf"], result["so_sndbuf"]))
    for site in result["top_sites"]:
        print("%8.0f B/poll  %7d blocks  %s" % (site["bytes_per_poll"], site["count"], site["site"]))
    print("traced, by part:")
    for part, size in result["parts"].items():
        print("%8.0f B/poll  %s" % (size, part))
    stack = result["data_stack"]
    print("a greenlet that ran Python, beyond one that did not: RSS %.0f B, mapped %.0f B, traced %.0f B "
          "(of which saved C stack %.0f B)" % (stack["rss"], stack["mapped"], stack["traced"], stack["saved_stack"]))
    if args.json:
        from instruments.page import machine_line
        from instruments.provenance import git

        result.update(command="python -m bench.anatomy " + " ".join(argv if argv is not None else sys.argv[1:]),
                      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                      commit=git("rev-parse", "--short=7", "HEAD", check=False), machine=machine_line())
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2, sort_keys=True)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
