"""The "What one held poll is made of" entry of docs/results.md, made from the anatomy that
`make bench` measures with its sweep (bench/anatomy.py, in its results.json).

    python -m results.anatomy docs/runs/bench.json
"""

import sys

from results import provenance_line, renderer_main, spaced, table
from results.bench import busy


def kernel_share(per_poll):
    if per_poll >= 0:
        return "%s B" % spaced(per_poll)
    return ("not measured: the machine-wide count it is taken from fell by %s B per poll meanwhile (other "
            "processes' sockets count in it)" % spaced(-per_poll))


def render(results):
    anatomy = results["anatomy"]
    lines = [provenance_line(results["provenance"], "make bench",
                             extra=" (its anatomy: bench/anatomy.py, %s polls held by the app in one process under "
                                   "tracemalloc)" % spaced(anatomy["held"]), busy=busy(results)), ""]
    rows = [("greenlets", "%.2f" % anatomy["greenlets_per_poll"]),
            ("RSS (under tracemalloc, which adds its own bookkeeping)", "%s B" % spaced(anatomy["rss_per_poll"])),
            ("Python allocations (traced)", "%s B" % spaced(anatomy["traced_per_poll"])),
            ("of which the parked greenlet's saved C stack", "%s B" % spaced(anatomy["saved_stack_per_poll"])),
            ("the server's share of the kernel's TCP memory", kernel_share(anatomy["kernel_tcp_per_poll"])),
            ("`SO_RCVBUF` / `SO_SNDBUF` of a loopback socket (reserved only when data is queued)",
             "%s / %s KiB" % (spaced(anatomy["so_rcvbuf"] / 1024), spaced(anatomy["so_sndbuf"] / 1024)))]
    rows += [("allocated at `%s`" % site["site"].split("site-packages/")[-1], "%s B" % spaced(site["bytes_per_poll"]))
             for site in anatomy.get("top_sites", [])]
    lines += table(("what", "per held poll"), rows)
    return lines


def main(argv=None):
    return renderer_main(__doc__, render, None, argv)


if __name__ == "__main__":
    sys.exit(main())
