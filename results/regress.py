"""The `make regress` entry of docs/results.md, made from the gate's own regress.json.

    python -m results.regress docs/runs/regress.json
    python -m results.regress reports/<timestamp>-regress/regress.json --keep docs/runs/regress.json
"""

import sys

from results import COMMIT_SHOWN, provenance_line, renderer_main, spaced, table


def kept(record):
    """The record without callgrind's per-phase counts."""
    record.pop("phases", None)
    return record


def render(record):
    baseline_commit = ((record.get("baseline_recorded_with") or {}).get("commit") or "unknown")[:COMMIT_SHOWN]
    lines = [provenance_line(record["provenance"], "make regress",
                             extra=" (instruction counts under callgrind do not depend on the machine's load)"),
             "", "Against `%s`, taken at commit %s; the gate is +%g %% per figure: **%s**." % (
                 record["baseline_path"], baseline_commit, record["gate_percent"],
                 "passed" if record["passed"] else "FAILED"), ""]
    rows = []
    for key, what in record["units"].items():
        now, then = record["figures"][key], record["baseline_figures"][key]
        change = "%+.1f %%" % ((now / then - 1) * 100)
        rows.append(("`%s`, %s" % (key, what.split(":")[0]), spaced(now), spaced(then), change,
                     record["verdicts"][key]))
    lines += table(("figure", "this commit", "baseline", "change", "verdict"), rows)
    return lines


def main(argv=None):
    return renderer_main(__doc__, render, kept, argv)


if __name__ == "__main__":
    sys.exit(main())
