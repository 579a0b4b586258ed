"""The `make test` entry of docs/results.md, made from the JSON harness/ci_timing.py wrote
from a CI run's log.

    python -m results.make_test docs/runs/make-test.json
"""

import sys

from results import provenance_line, renderer_main, table


def minutes(seconds):
    whole, rest = divmod(round(seconds), 60)
    return "%d min %d s" % (whole, rest)


def render(timing):
    counts = timing["counts"]
    lines = [provenance_line(timing["provenance"], "make test"), "",
             "%s; %s." % (", ".join("%d %s" % (number, kind) for kind, number in sorted(counts.items())),
                          "**%s**" % minutes(timing["seconds"]))]
    if timing.get("slowest"):
        lines += ["", "The longest:", ""] + table(("test", "phase", "seconds"), [
            ("`%s`" % entry["test"], entry["phase"], "%.1f" % entry["seconds"]) for entry in timing["slowest"]])
    return lines


def main(argv=None):
    return renderer_main(__doc__, render, None, argv)


if __name__ == "__main__":
    sys.exit(main())
