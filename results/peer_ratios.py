"""docs/results.md's entry "Chattle beside the aiohttp peers at 10,000 held polls", made
from the sweep's own results.json kept as docs/runs/held-poll-peers.json, with the run's
command, date, commit and machine added beside it ("provenance"), so that a figure and its
provenance cannot part.

    python -m results.peer_ratios docs/runs/held-poll-peers.json

Paste what it prints between the entry's markers; tests/test_docs.py fails when the two differ.
"""

import sys

from instruments.page import print_results_entry


def section(record):
    """The entry's lines: the run, then Chattle / each peer for memory and time per waiter."""
    run = record["provenance"]
    lines = ["`%s` — %s UTC, commit %s, %s; %s. Median of %d rounds, each server fresh per round, "
             "the same rig for all." % (run["command"], run["date"], run["commit"], run["machine"], run["load"],
                                         record["repeats"]),
             "",
             "| peer, held polls | Chattle, RSS per held poll | peer | Chattle / peer | Chattle, time per waiter "
             "| peer | Chattle / peer |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for ratio in record["peer_ratios"]:
        lines.append("| %s, %d | %s B | %s B | %.2f | %.1f us | %.1f us | %.2f |" % (
            ratio["peer"], ratio["requested"], format(round(ratio["chattle_bytes_per_poll"]), ",d"),
            format(round(ratio["peer_bytes_per_poll"]), ",d"), ratio["memory_ratio"],
            ratio["chattle_s_per_waiter"] * 1e6, ratio["peer_s_per_waiter"] * 1e6, ratio["time_per_waiter_ratio"]))
    return lines


def main(argv=None):
    return print_results_entry(section, argv, "docs/results.md's peer-ratio entry from the sweep's JSON")


if __name__ == "__main__":
    sys.exit(main())
