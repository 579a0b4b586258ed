"""The `make soak` entry of docs/results.md, made from the soak's own soak.json.

    python -m results.soak docs/runs/soak.json
    python -m results.soak reports/<timestamp>-soak/soak.json --keep docs/runs/soak.json
"""

import sys

from results import provenance_line, renderer_main, spaced, table


def kept(result):
    """The soak's result without its samples' detail (the idle rows and the cold start)."""
    result.pop("before_any_load", None)
    result.pop("idle", None)
    result.pop("growing_sites", None)
    return result


def render(result):
    counters = result.get("driver_counters", {})
    lines = [provenance_line(result["provenance"], "make soak",
                             extra=" (%s; %d listeners, %g %% churn a minute, %g posts/s, %g hostile clients/s; "
                                   "load %.0f min, the first %.0f a warm-up)" % (
                                       "gunicorn x%d on a redis-server of its own" % result["workers"]
                                       if result["workers"] > 1 else "python chattle.py",
                                       result["listeners"], result["churn_per_minute"] * 100,
                                       result["posts_per_second"], result["hostile_per_second"],
                                       result["duration_s"] / 60, result["warm_up_s"] / 60)),
             "", "**%s**. The load did %s." % (
                 "Passed" if result["passed"] else "FAILED",
                 ", ".join("%s %s" % (name.replace("_", " "), spaced(value) if isinstance(value, (int, float))
                                      else value) for name, value in sorted(counters.items()))), ""]
    rows = [(verdict["figure"], verdict.get("why", ""), "pass" if verdict["passed"] else "**FAIL**")
            for verdict in result["verdicts"]]
    lines += table(("figure over the steady part", "judged", "verdict"), rows)
    back = result["return_to_idle"]
    failed = [figure["figure"] for figure in back["figures"] if not figure["passed"]]
    lines += ["", "Back to idle after the load in %.0f s: %s." % (
        back["seconds"], "every figure" if not failed else "**not** " + ", ".join(failed))]
    if result.get("load_errors"):
        lines.append("The load saw errors: %s." % result["load_errors"])
    return lines


def main(argv=None):
    return renderer_main(__doc__, render, kept, argv)


if __name__ == "__main__":
    sys.exit(main())
