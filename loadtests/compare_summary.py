"""The verdict of `make load BASE=` as Markdown, for a CI job's summary ($GITHUB_STEP_SUMMARY)
or a pull request comment: written by `make load BASE=<rev> SUMMARY=<file>`, or afterwards
from a report with

    python -m loadtests.compare_summary reports/<timestamp>-compare [--out FILE]

It renders compare.json's fields as they are: the verdict and exit status, the reasons,
every other text field of the verdict (the quoted error rates of this machine among them),
and a line per figure.
"""

import argparse
import glob
import json
import os
import sys

# compare.json's fields that describe the run rather than the verdict: the report has them.
CONTEXT_FIELDS = frozenset({"verdict", "exit_code", "reasons", "figures", "base_revision", "base_commit",
                            "head_commit", "settings_line", "load_argv", "head_env", "settings", "machine",
                            "delivery", "wrong_in_head", "charts", "round_reports"})
FIGURE_COLUMNS = ("figure", "base", "head", "head / base", "95 % interval", "threshold", "detects", "verdict")
MARK = {"worse": "❌", "better": "✅", "unchanged": "✅"}


def _percent(ratio):
    return "%+.1f %%" % ((ratio - 1) * 100)


def _value(value, unit):
    return "%.4g %s" % (value, unit) if isinstance(value, (int, float)) else "–"


def figure_line(entry):
    if "ratio" not in entry:
        return "| %s | not compared: %s |||||||" % (entry.get("label", "?"), entry.get("why", "no figures"))
    return "| %s | %s | %s | %s | %s to %s | +%g %% | +%.1f %% | %s |" % (
        entry.get("label", "?"), _value(entry.get("base_median"), entry.get("unit", "")),
        _value(entry.get("head_median"), entry.get("unit", "")), _percent(entry["ratio"]), _percent(entry["low"]),
        _percent(entry["high"]), entry.get("threshold_percent", 0), entry.get("detectable", 0) * 100,
        entry.get("verdict", "?"))


def markdown(compare, report_dir=None):
    """The Markdown of one comparison (compare.json as a dict)."""
    verdict = compare.get("verdict", "?")
    lines = ["### %s Load against base %s: **%s** (exit %s)" % (MARK.get(str(verdict).lower(), "⚠️"),
                                                                 compare.get("base_revision", "?"), verdict,
                                                                 compare.get("exit_code", "?")), ""]
    if compare.get("head_commit") and compare.get("base_commit"):
        lines += ["head `%s` against base `%s`; %s" % (compare["head_commit"][:12], compare["base_commit"][:12],
                                                        compare.get("settings_line", "")), ""]
    lines += ["- %s" % reason for reason in compare.get("reasons") or []]
    for key, value in compare.items():
        if key in CONTEXT_FIELDS or value in (None, "", [], {}):
            continue
        if isinstance(value, str):
            lines.append("- **%s**: %s" % (key.replace("_", " "), value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append("- **%s**: %g" % (key.replace("_", " "), value))
        elif isinstance(value, dict) and any(word in key for word in ("calibration", "error")):
            lines.append("- **%s**: `%s`" % (key.replace("_", " "), json.dumps(value, sort_keys=True)))
    figures = (compare.get("figures") or {}).values()
    if figures:
        lines += ["", "| %s |" % " | ".join(FIGURE_COLUMNS), "|%s" % ("---|" * len(FIGURE_COLUMNS))]
        lines += [figure_line(entry) for entry in figures]
    wrong = compare.get("wrong_in_head")
    if wrong:
        lines += ["", "Messages wrong in head: %s." % ", ".join("%s %s" % (count, kind.replace("_", " "))
                                                               for kind, count in sorted(wrong.items()))]
    if report_dir:
        lines += ["", "Report: `%s` (the job's artifact holds it)." % os.path.join(report_dir, "report.html")]
    return "\n".join(lines) + "\n"


def without_report(code, problem):
    return ("### ⚠️ Load against base: **could not compare** (exit %s)\n\n- %s\n"
            % (code, problem or "no comparison report was written: the job's log says why"))


def report_since(report_root, started):
    """The compare report directory written under `report_root` at or after `started` (a
    time.time()), the newest if several; None when there is none."""
    found = [os.path.dirname(path) for path in glob.glob(os.path.join(report_root, "*-compare", "compare.json"))
             if os.path.getmtime(path) >= started]
    return max(found, key=os.path.getmtime) if found else None


def append(path, report_dir, code, problem=None):
    """Appends the summary to `path` (a job summary file collects every step's), from
    report_dir's compare.json, or says why there is none."""
    if report_dir:
        with open(os.path.join(report_dir, "compare.json")) as source:
            text = markdown(json.load(source), report_dir)
    else:
        text = without_report(code, problem)
    with open(path, "a") as out:
        out.write(text + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="a compare report directory (reports/<timestamp>-compare)")
    parser.add_argument("--out", help="append to this file (default: print)")
    args = parser.parse_args(argv)
    source = os.path.join(args.report, "compare.json")
    if not os.path.exists(source):
        print("compare_summary: no compare.json in %s" % args.report, file=sys.stderr)
        return 2
    if args.out:
        append(args.out, args.report, None)
    else:
        with open(source) as data:
            sys.stdout.write(markdown(json.load(data), args.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
