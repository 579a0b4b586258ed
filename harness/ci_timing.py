"""How long `make test` took, as a results entry's JSON: read from pytest's own summary in
the log of a run (`.ci/run` keeps it in reports/ci-make-test.log), with its provenance.

    python -m harness.ci_timing --write docs/runs/make-test.json [--log reports/ci-make-test.log]

pytest's last line gives the counts and the seconds ("534 passed, 3 deselected in 594.12s");
its "slowest durations" list (`make test` asks for it) gives the longest tests.
"""

import argparse
import json
import os
import re
import sys
import time

from instruments.provenance import ROOT, provenance

LOG = os.path.join(ROOT, "reports", "ci-make-test.log")
SUMMARY = re.compile(r"^(?:=+ )?(?P<counts>\d+ (?:passed|failed|error)[^=\n]*?) in (?P<seconds>[\d.]+)s"
                     r"(?: \([\d:]+\))?(?: =+)?$", re.M)
COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)")
SLOWEST = re.compile(r"^(?P<seconds>[\d.]+)s (?P<phase>call|setup|teardown) +(?P<test>.+?) *$", re.M)
LONGEST_KEPT = 10


def timing(log_text):
    """{counts, seconds, slowest}: the last pytest summary in the log, and its slowest tests."""
    summaries = list(SUMMARY.finditer(log_text))
    if not summaries:
        raise ValueError("no pytest summary line (`N passed ... in S s`) in the log")
    last = summaries[-1]
    counts = {kind.rstrip("s") if kind.startswith(("error", "warning")) else kind: int(number)
              for number, kind in COUNT.findall(last.group("counts"))}
    slowest = [{"test": match.group("test"), "phase": match.group("phase"), "seconds": float(match.group("seconds"))}
               for match in SLOWEST.finditer(log_text[:last.start()])]
    slowest.sort(key=lambda entry: -entry["seconds"])
    return {"counts": counts, "seconds": float(last.group("seconds")), "slowest": slowest[:LONGEST_KEPT]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", default=LOG, help="the run's output (default %(default)s)")
    parser.add_argument("--write", metavar="PATH", required=True, help="the JSON to write (docs/runs/make-test.json)")
    parser.add_argument("--command", default=".ci/run", help="the command that ran (default %(default)s)")
    args = parser.parse_args(argv)
    with open(args.log, encoding="utf-8", errors="replace") as source:
        figures = timing(source.read())
    ended = os.path.getmtime(args.log)
    figures["provenance"] = provenance(command=args.command, started=ended - figures["seconds"])
    figures["provenance"]["load_average"] = None  # taken now, after the run: it says nothing of the run
    figures["log_written"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ended))
    with open(args.write, "w") as out:
        json.dump(figures, out, indent=1, sort_keys=True)
        out.write("\n")
    print("ci_timing: %s in %.0f s, written to %s" % (figures["counts"], figures["seconds"], args.write))
    return 0


if __name__ == "__main__":
    sys.exit(main())
