"""docs/results.md is made from the runs' own JSON, so that a figure and its provenance
(command, date, commit, machine) cannot part.

The convention: an entry's generated part sits between two comments,

    <!-- made by: python -m <module> docs/runs/<file>.json -->
    ...what that command prints...
    <!-- end -->

`<module>` is a renderer: its `main(argv)` prints the block for the run JSON it is given
(more than one path for a block made from several runs, such as the figure per question).
Its first line names the command as run, the date, the commit and the machine, from the
JSON's "provenance" (instruments/provenance.py writes it; every run command puts it in the
JSON it writes). `make results` (python -m results.make) rewrites every block in place;
tests/test_docs.py fails when a block is not what its command prints and when a file in
docs/runs/ is rendered by no block.

Every renderer lives here, one module per kind of run: load (make load, also on a Redis
Cluster), bench, capacity, regress, soak, faults (the fault matrix), peers and peer_ratios
(Chattle beside aiohttp and nginx with Nchan), held_poll (the anatomy of a held poll, before
and after), proxy (nginx with TLS in front), clocks (make cluster-demo), make_test (CI's
timing) and questions (one figure per question, from several runs). loadtests.stopping and
loadtests.tls_cost print their own blocks: a seeded simulation, and a measurement that is its
own command.

To add an entry: run the command; keep its JSON small (`python -m <renderer> <report json>
--keep docs/runs/<name>.json` drops per-listener data); put the two comments under the
entry's heading in docs/results.md; `make results`. Prose beside a block explains; the
figures are the block's.
"""

import argparse
import json
import sys

COMMIT_SHOWN = 7  # characters of a commit hash a page shows


def read_json(path):
    with open(path) as source:
        return json.load(source)


def keep_json(path, data):
    """Write a run's JSON as docs/runs/ keeps it: small, one key a line where short."""
    with open(path, "w") as out:
        json.dump(data, out, indent=1, sort_keys=True, default=str)
        out.write("\n")


def shared_note(provenance, others_percent=None):
    """How busy the machine was: what the run recorded of other processes, else the load average."""
    if others_percent is not None:
        return "shared machine: other processes used %.0f %% of a core on average during the run" % others_percent
    load = provenance.get("load_average")
    return ("shared machine: load average %.1f at the start" % load if load is not None
            else "shared machine")


def provenance_line(provenance, goal, others_percent=None, extra="", busy=None):
    """An entry's first line: the goal, the command as run, date, commit, machine, how busy
    (`busy`: what the run itself recorded of the machine's load, said in its own words)."""
    commit = (provenance.get("commit") or "unknown")[:COMMIT_SHOWN]
    if provenance.get("dirty"):
        commit += " with uncommitted changes"
    environment = provenance.get("bench_environment") or {}
    command = " ".join(["%s=%s" % item for item in sorted(environment.items())] + [provenance["command"]])
    return "`%s` (`%s`)%s — %s, commit %s, %s; %s." % (
        goal, command, extra, provenance["date"], commit, provenance["machine"],
        busy or shared_note(provenance, others_percent))


def table(header, rows, align=None):
    """A Markdown table: header cells, rows of cells, alignment marks (--- or ---:) per column."""
    align = align or ["---"] * len(header)
    return (["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
            + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def plural(count, word):
    return "%s %s%s" % (spaced(count), word, "" if count == 1 else "s")


def spaced(number):
    """10 000 as a page writes it."""
    return "{:,}".format(int(round(number))).replace(",", " ")


def renderer_main(doc, render, kept=None, argv=None):
    """The command line every renderer shares: print the block for a run's JSON; --keep PATH
    also writes that JSON, trimmed by `kept`, for docs/runs/."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("run", help="the run's JSON (a report's, or its kept copy in docs/runs/)")
    parser.add_argument("--keep", metavar="PATH", help="also write the JSON, without what a page never shows, "
                                                       "to PATH (docs/runs/<name>.json)")
    args = parser.parse_args(argv)
    data = read_json(args.run)
    if args.keep:
        data = kept(data) if kept else data
        keep_json(args.keep, data)
    print("\n".join(render(data)))
    return 0


if __name__ == "__main__":
    sys.exit("results: run `python -m results.make`")
