"""docs/results.md's "One figure per question": each question other pages ask, with the one
current figure that answers it, taken from the runs kept in docs/runs/ (one run a question).

    python -m results.questions docs/runs/bench.json docs/runs/load-default.json ...

A question whose run is not among the paths, or not kept yet, is left out.
"""

import argparse
import os
import sys

from results import COMMIT_SHOWN, read_json, spaced


def commit(run):
    provenance = run.get("provenance") or run.get("run", {}).get("provenance") or run.get("git") or {}
    return (provenance.get("commit") or "?")[:COMMIT_SHOWN]


def bench_point(bench, workers, count):
    matches = [point for point in bench["points"] if point["workers"] == workers and point["requested"] == count]
    return matches[0] if matches else None


def memory_per_held_poll(bench):
    point = max((point for point in bench["points"] if point["workers"] == 1), key=lambda point: point["requested"])
    return "%.1f KiB holding %s polls on one process" % (point["bytes_per_poll_median"] / 1024,
                                                          spaced(point["requested"]))


def wake_up_10000(bench):
    point = bench_point(bench, 1, 10000)
    if point is None:
        return None
    return "p50 %.0f ms, p99 %.0f ms" % (point["latency"]["p50"] * 1000, point["latency"]["p99"] * 1000)


def default_load(summary):
    latency, delivery = summary["wakeup_latency_s"], summary["delivery"]
    return "wake-up p99 %.0f ms for bursts of %d posts to %s listeners; %d lost" % (
        latency["p99"] * 1000, summary["run"]["burst_size"], spaced(summary["run"]["users"]), delivery["lost"])


def capacity_one_worker(results):
    found = [server for server in results["servers"] if server["workers"] == 1 and not server.get("env")]
    if not found or not found[0]["search"]["capacity"]:
        return None
    from results.capacity import held_back

    return "%s%s held polls (p99 objective %.0f ms)%s" % (
        "at least " if held_back(found[0]) else "", spaced(found[0]["search"]["capacity"]), results["slo_s"] * 1000,
        ": the open files ran out first" if held_back(found[0]) else "")


def instructions(record):
    figures = record["figures"]
    return "%s per parked poll, %s per answered poll, %s per post" % (
        spaced(figures["poll_parked"]), spaced(figures["poll_answered"]), spaced(figures["post"]))


def make_test_time(timing):
    minutes, seconds = divmod(round(timing["seconds"]), 60)
    return "%d min %d s for %d tests" % (minutes, seconds, timing["counts"].get("passed", 0))


def faults_lose(matrix):
    return "%d lost silently over %d faults, %d duplicated; %s" % (
        sum(row["lost_silently"] for row in matrix["rows"]), len(matrix["rows"]),
        sum(row["duplicated"] for row in matrix["rows"]), "every row passed" if matrix["passed"] else "rows FAILED")


def soak_flat(result):
    failed = [verdict["figure"] for verdict in result["verdicts"] if not verdict["passed"]]
    return "%s over %.0f min of load" % ("every figure flat" if not failed else "growing: " + ", ".join(failed),
                                          result["duration_s"] / 60)


# (question, the run's file in docs/runs/, its entry's anchor, the figure from the run)
QUESTIONS = (
    ("Memory per held poll", "bench.json", "make-bench", memory_per_held_poll),
    ("Wake-up latency of one post to 10 000 held polls, one worker", "bench.json", "make-bench", wake_up_10000),
    ("A default `make load`", "load-default.json", "a-default-make-load", default_load),
    ("Held polls one worker wakes within the objective", "capacity.json", "make-capacity", capacity_one_worker),
    ("Instructions per operation", "regress.json", "make-regress", instructions),
    ("What each fault loses", "faults-matrix.json", "faults", faults_lose),
    ("Whether memory and descriptors stay flat under steady load", "soak.json", "soak", soak_flat),
    ("How long `make test` takes", "make-test.json", "make-test", make_test_time),
)


def render(runs):
    """runs: {file name: its JSON}."""
    lines = []
    for question, name, anchor, figure in QUESTIONS:
        run = runs.get(name)
        answer = figure(run) if run is not None else None
        if answer:
            lines.append("- **%s**: %s ([commit %s](#%s))." % (question, answer, commit(run), anchor))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="the runs' JSON in docs/runs/")
    args = parser.parse_args(argv)
    print("\n".join(render({os.path.basename(path): read_json(path) for path in args.runs if os.path.exists(path)})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
