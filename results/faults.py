"""docs/results.md's Faults entry, made from the matrix's own JSON, so that a figure and
its provenance cannot part.

    python -m results.faults docs/runs/faults-matrix.json

`make load CHAOS=all` writes reports/<timestamp>-chaos/chaos.json; keep it as
docs/runs/faults-matrix.json with `--keep docs/runs/faults-matrix.json` (which drops what a
page does not need: each listener's account, the probe's posts), then `make results`
rewrites the entry's block (the convention: results/__init__.py). tests/test_docs.py fails
when the two differ.
"""

import argparse
import datetime
import json
import sys

from loadtests.faults import refused_text

COLUMNS = ("fault", "lost silently", "signalled", "duplicated", "refused (outcome unknown)",
           "time without service", "verdict")


def kept(matrix):
    """The matrix without what a page never shows (each listener's account, long lists)."""
    for row in matrix["rows"]:
        row.pop("per_listener", None)
        record = row.get("record", {})
        for name, value in list(record.items()):
            if isinstance(value, list) and len(value) > 20:
                record[name] = len(value)
    return matrix


def section(matrix):
    """The entry's lines: what was run, when, on which commit and machine, then the table."""
    started = datetime.datetime.fromtimestamp(matrix["started"], datetime.timezone.utc)
    minutes, seconds = divmod(round(matrix["seconds"]), 60)
    others = matrix.get("other_processes_cpu_percent")
    load = ("quiet" if not others or others["highest"] < 25 else
            "shared: other processes used %d to %d %% of a core during the runs" % (others["lowest"],
                                                                                    others["highest"]))
    lines = [
        "`make load CHAOS=all %s` ([faults.md](faults.md)) — %s UTC, %d min %d s for the %d runs, "
        "commit %s, %s; %s. %s." % (
            " ".join(arg.lstrip("-").upper().replace("-", "_") + "=" + value
                     for arg, value in zip(matrix["argv"][::2], matrix["argv"][1::2])),
            started.strftime("%Y-%m-%d %H:%M"), minutes, seconds, len(matrix["rows"]),
            matrix["git"]["commit"][:7], matrix["machine"], load,
            "Every row passed" if matrix["passed"] else "Some rows FAILED"),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in matrix["rows"]:
        without = row["time_without_service_s"]
        lines.append("| %s | %d | %d | %d | %s | %s | %s |" % (
            row["fault"], row["lost_silently"], row["signalled"], row["duplicated"], refused_text(row),
            "never" if without is None else "%.1f s" % without, row["verdict"]))
    notes = [note for note in (row_note(row) for row in matrix["rows"]) if note]
    if notes:
        lines += [""] + notes
    return lines


def row_note(row):
    """What a row's own checks measured, from the fault's record."""
    record = row.get("record", {})
    if row["fault"] == "redis-pause" and record.get("pause_s"):
        return "- `redis-pause`: Redis was stopped for %.1f s; the time without service is that pause." % (
            record["pause_s"])
    if row["fault"] == "vanished-clients" and record.get("released_after_s") is not None:
        return "- `vanished-clients`: %s listeners reset their connections; `/stats` waiters dropped by as many " \
               "%.2f s later." % (record.get("vanished"), record["released_after_s"])
    if row["fault"] == "room-evict" and record.get("rooms_forgotten") is not None:
        return "- `room-evict`: the workers forgot %d rooms at the byte bound (`/stats` `rooms_forgotten`)." % (
            record["rooms_forgotten"])
    if row["fault"] == "slow-readers" and record.get("rss_growth") is not None:
        return "- `slow-readers`: %d connections that never read; the serving processes' RSS grew %.1f MiB." % (
            record.get("slow_readers", 0), record["rss_growth"] / 2 ** 20)
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("matrix", help="a chaos.json that make load CHAOS=... wrote (or its kept copy)")
    parser.add_argument("--keep", metavar="PATH", help="also write the matrix, without what a page never shows, "
                                                       "to PATH (docs/runs/faults-matrix.json)")
    args = parser.parse_args(argv)
    with open(args.matrix) as source:
        matrix = json.load(source)
    if args.keep:
        with open(args.keep, "w") as out:
            json.dump(kept(matrix), out, indent=1)
    print("\n".join(section(matrix)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
