"""docs/results.md's entry "Where a held poll's memory goes", made from two runs of
`python -m bench.anatomy --json` (docs/runs/held-poll-anatomy.json: "before" and "after",
each with its command, date, commit and machine), so that a figure and its provenance
cannot part. It does not import bench.anatomy, which patches the standard library for
gevent as it is imported.

    python -m results.held_poll docs/runs/held-poll-anatomy.json

Paste what it prints between the entry's markers; tests/test_docs.py fails when the two differ.
"""

import sys

from instruments.held_poll_parts import PARTS
from instruments.page import print_results_entry


def provenance(run):
    return "`%s`, %s UTC, commit %s, %s" % (run["command"], run["date"], run["commit"], run["machine"])


def section(record):
    """The entry's lines: the two runs, then a table of bytes per held poll, before and after."""
    before, after = record["before"], record["after"]
    rows = [("RSS per held poll under tracemalloc (its own bookkeeping included)", "rss_per_poll")]
    lines = ["Before: %s." % provenance(before), "", "After: %s." % provenance(after), "",
             "The machine was shared with other jobs; the traced bytes and the mapping sizes do not "
             "depend on them.", "",
             "| bytes per held poll (%d held) | before | after |" % after["held"], "| --- | ---: | ---: |"]

    def row(label, old, new):
        lines.append("| %s | %s | %s |" % (label, format(round(old), ",d"), format(round(new), ",d")))

    stack_before, stack_after = before["data_stack"], after["data_stack"]
    row("the greenlet's own data stack, untraced: what a greenlet that ran Python adds to RSS beyond "
        "one that did not, less what it adds to the traced bytes (below)",
        stack_before["rss"] - stack_before["traced"], stack_after["rss"] - stack_after["traced"])
    row("traced by tracemalloc, in all", before["traced_per_poll"], after["traced_per_poll"])
    for part, _files in PARTS + (("other", ()),):
        row("&nbsp;&nbsp;%s" % part, before["parts"][part], after["parts"][part])
    row("&nbsp;&nbsp;&nbsp;&nbsp;of which the saved C stack (greenlet's `_stack_saved`)",
        before["saved_stack_per_poll"], after["saved_stack_per_poll"])
    for label, key in rows:
        row(label, before[key], after[key])
    lines += ["", "A greenlet that ran Python code beside one that did not, %d of each parked (after's run): "
              "%s B more RSS, %s B more anonymous mapping (`/proc/self/smaps`), %s B more traced, of which "
              "%s B saved C stack." % (5000, format(round(stack_after["rss"]), ",d"),
                                       format(round(stack_after["mapped"]), ",d"),
                                       format(round(stack_after["traced"]), ",d"),
                                       format(round(stack_after["saved_stack"]), ",d"))]
    return lines


def main(argv=None):
    return print_results_entry(section, argv, "docs/results.md's held-poll memory entry from its runs' JSON")


if __name__ == "__main__":
    sys.exit(main())
