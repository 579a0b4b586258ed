"""docs/results.md's entry for nginx in front, made from the runs' own JSON, so that a
figure and its provenance cannot part.

    python -m results.proxy docs/runs/proxy-nginx-tls.json             # print the entry
    python -m results.proxy --keep docs/runs/proxy-nginx-tls.json reports/<ts>-load

`make load PROXY=nginx [TLS=1]` writes the proxied run's summary.json with the direct
run's figures beside it; `--keep` copies what the entry needs from it (the command, date,
commit and machine the run recorded, the checks, both runs' figures) to docs/runs/.
The entry is pasted between its `<!-- made by: ... -->` and `<!-- end -->` lines in
docs/results.md; tests/test_docs.py fails when the two differ.
"""

import argparse
import datetime
import json
import os
import sys

from instruments.page import print_entry, write_json
from loadtests.proxy_cost import table_rows


def kept(summary):
    """What the entry shows of a proxied run's summary.json."""
    run = summary["run"]
    cost = summary["proxy_cost"]
    git = run.get("git") or {}
    return {"command": run.get("command"), "started": run["started"], "commit": git.get("commit"),
            "dirty": git.get("dirty"), "machine": summary["machine_line"], "proxy": run.get("proxy"),
            "tls": run.get("tls"), "users": run["users"], "passed": summary["passed"],
            "without_passed": cost["without_passed"],
            "failed_checks": [entry["check"] for entry in summary["checks"] if not entry["passed"]],
            "other_processes_cpu_mean": summary.get("other_processes_cpu_mean"),
            "without": cost["without"], "with": cost["with"]}


def section(entry):
    """The entry's lines: the command, date, commit and machine, then the table."""
    started = datetime.datetime.fromtimestamp(entry["started"], datetime.timezone.utc)
    others = entry.get("other_processes_cpu_mean")
    verdict = ("both runs passed every check" if entry["passed"] and entry["without_passed"] else
               "FAILED: %s" % ", ".join(entry["failed_checks"] or ["the run without the proxy"]))
    lines = [
        "`%s` — %s UTC, commit %s%s, %s; shared machine (other processes %s); %s. The same load "
        "first straight to the server, then through nginx%s; the client read its held polls by the %s path "
        "without nginx, by the %s path through it." % (
            entry["command"], started.strftime("%Y-%m-%d %H:%M"), (entry["commit"] or "?")[:7],
            " with uncommitted changes" if entry["dirty"] else "", entry["machine"],
            "%.0f %% of a core on average" % others if others is not None else "not measured", verdict,
            " with TLS" if entry["tls"] else "", paths(entry["without"]), paths(entry["with"])),
        "",
        "| %d listeners | without nginx | through nginx%s |" % (entry["users"], " with TLS" if entry["tls"] else ""),
        "| --- | ---: | ---: |",
    ]
    for label, before, after, unit in table_rows(entry["without"], entry["with"]):
        lines.append("| %s | %s | %s |" % (label, "%s %s" % (before, unit) if before != "-" and unit else before,
                                          "%s %s" % (after, unit) if after != "-" and unit else after))
    return lines


def paths(figures):
    """How that run's client read its held polls (loadtests/longpoll.py): compiled, or Python."""
    names = {"compiled": "compiled", "python": "Python", "tls": "Python", "receipts": "Python"}
    return " and ".join(sorted({names.get(path, path) for path in figures.get("held_paths") or ["?"]}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("entry", help="the kept JSON (docs/runs/<name>.json)")
    parser.add_argument("--keep", metavar="REPORT_DIR",
                        help="first write the entry's JSON from this proxied run's report directory")
    args = parser.parse_args(argv)
    if args.keep:
        with open(os.path.join(args.keep, "summary.json")) as source:
            summary = json.load(source)
        if not summary.get("proxy_cost"):
            parser.error("%s is not a run of make load PROXY=nginx (no proxy_cost in its summary)" % args.keep)
        write_json(args.entry, kept(summary))
    return print_entry(args.entry, section)


if __name__ == "__main__":
    sys.exit(main())
