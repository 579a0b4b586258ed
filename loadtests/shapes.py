"""The LoadTestShapes that play the stage tables of loadtests/scenario.py."""

import json
import os
import time

from locust import LoadTestShape
from locust.runners import STATE_MISSING

from instruments.measures import LatencyHistogram
from loadtests.options import from_locust
from loadtests.scenario import SETTLE_SECONDS, SHAPE_STARTED_FILE, build_stages, build_step_stages, stage_at


class StagedShape(LoadTestShape):
    """Plays the stage table built from the run's options. After the last stage it keeps
    zero users until every worker reports all its listeners ended (caught up, ledgers
    sent), at most SETTLE_SECONDS; then None ends the run. Ending at once would cut
    off listeners still catching up, and their messages would look lost."""

    stages = None
    run_tally = None          # the master's RunTally, set by the locustfile
    stop_requested_at = None  # set by request_stop: end early, but as a run ends

    @classmethod
    def request_stop(cls):
        """Stop now, the way a run ends: every listener stops at --stop-rate, catches up and
        reports its ledger, and only then does the run end. The orchestrator asks for it
        (SIGUSR1) on Ctrl-C, because Locust handles no SIGTERM while a shape runs and its
        own Ctrl-C path gives the workers half a second to report."""
        if cls.stop_requested_at is None:
            cls.stop_requested_at = time.monotonic()

    @staticmethod
    def table(options):
        scenario = from_locust(options)
        return build_stages(scenario.users, scenario.posters, scenario.duration, scenario.spawn_rate,
                            scenario.stop_rate)

    def connected_workers(self):
        """Ids of the workers the master still hears (Locust marks one missing after
        HEARTBEAT_LIVENESS silent seconds, then drops it); None on a local runner."""
        clients = getattr(self.runner, "clients", None)
        if clients is None:
            return None
        return {client.id for client in clients.all if client.state != STATE_MISSING}

    def tick(self):
        if self.stages is None:
            options = self.runner.environment.parsed_options
            self.stages = self.table(options)
            # The stages' 0 s on the wall clock: the report's samples and charts use it too,
            # not the Locust process's start (the master may first wait for its workers);
            # in raw/ at once, for the orchestrator's progress line.
            started = time.time() - self.get_run_time()
            if self.run_tally is not None:
                self.run_tally.shape_started = started
            raw_dir = getattr(options, "raw_dir", "")
            if raw_dir:
                os.makedirs(raw_dir, exist_ok=True)
                with open(os.path.join(raw_dir, SHAPE_STARTED_FILE), "w") as out:
                    out.write("%.6f\n" % started)
        last = self.stages[-1]
        drained = self.run_tally is not None and self.run_tally.drained(self.connected_workers())
        if self.stop_requested_at is not None:
            if drained or time.monotonic() > self.stop_requested_at + last["end"] - last["start"] + SETTLE_SECONDS:
                return None
            return 0, last["spawn_rate"]
        elapsed = self.get_run_time()
        stage = stage_at(self.stages, elapsed)
        if stage is not None:
            return stage["users"], stage["spawn_rate"]
        if elapsed < last["end"] + SETTLE_SECONDS and not drained:
            return 0, last["spawn_rate"]
        return None


class SteppedShape(StagedShape):
    """SHAPE=steps: listeners held in steps of --step, one burst at each; the run ends, as a
    run ends, after the first step whose p99 wake-up breaks --slo or whose delivery is
    incomplete. Each step is judged from the master's tally once its settling wait is over:
    the wake-ups that arrived from its burst to then, against the posts of its burst times
    the listeners it held. The verdicts go to raw/steps.json for the summary."""

    abstract = True       # not found in the locustfile: --shape steps puts it in StagedShape's place
    steps = None          # one verdict per step judged
    wall_started = None   # the run's start on the wall clock (posts and arrivals are stamped on it)

    @staticmethod
    def table(options):
        scenario = from_locust(options)
        return build_step_stages(scenario.step, scenario.users, scenario.posters, scenario.spawn_rate,
                                 scenario.stop_rate)

    def tick(self):
        if self.wall_started is None:
            self.wall_started = time.time() - self.get_run_time()
            self.steps = []
        elif self.stop_requested_at is None:
            self.judge_steps(self.get_run_time())  # before the next step's users are asked for
        return super().tick()

    def judge_steps(self, elapsed):
        options = self.runner.environment.parsed_options
        for settle in (s for s in self.stages if s["name"] == "settle" and s["end"] <= elapsed):
            if any(verdict["step"] == settle["step"] for verdict in self.steps):
                continue
            burst = next(s for s in self.stages if s["name"] == "bursts" and s["step"] == settle["step"])
            verdict = judge_step(self.run_tally, settle["step"], settle["listeners"], options.rooms,
                                 self.wall_started + burst["start"], self.wall_started + burst["end"],
                                 self.wall_started + settle["end"], options.slo / 1000.0)
            self.steps.append(verdict)
            if options.raw_dir:
                os.makedirs(options.raw_dir, exist_ok=True)
                with open(os.path.join(options.raw_dir, "steps.json"), "w") as out:
                    json.dump({"slo_s": options.slo / 1000.0, "step": options.step, "steps": self.steps}, out)
            print("chattle: step %d, %d listeners: %s" % (verdict["step"], verdict["listeners"], step_line(verdict)),
                  flush=True)
            if not verdict["held"]:
                self.request_stop()
                return


def judge_step(tally, number, listeners, rooms, burst_start, burst_end, settled_at, slo):
    """One step's verdict from the run's tally: its burst's posts, and the wake-ups that
    arrived from the burst's start to the end of its settling wait."""
    # A burst starts in its stage but, on a busy server, its last posts are accepted seconds later
    posts = [post for post in tally.posts if burst_start - 1 <= post[2] < settled_at]
    latency = LatencyHistogram()
    for second in range(int(burst_start), int(settled_at) + 1):
        pair = tally.seconds.get(second)
        if pair is not None:
            latency.add(pair[0])
    expected = len(posts) * (listeners // max(1, rooms))  # rooms share the listeners evenly
    p99 = latency.percentile(0.99)
    delivered = latency.count
    held = bool(posts) and delivered >= expected and p99 is not None and p99 <= slo
    return {"step": number, "listeners": listeners, "posts": len(posts), "expected": expected,
            "delivered": delivered, "p50_s": latency.percentile(0.50), "p99_s": p99, "held": held}


def step_line(verdict):
    return ("%s: %d posts, %d of %d deliveries, p50 %s ms, p99 %s ms"
            % ("held" if verdict["held"] else "BROKE", verdict["posts"], verdict["delivered"], verdict["expected"],
               "-" if verdict["p50_s"] is None else "%.0f" % (verdict["p50_s"] * 1000),
               "-" if verdict["p99_s"] is None else "%.0f" % (verdict["p99_s"] * 1000)))


def steps_summary(path):
    """The summary's lines of a stepped run: the last step that held, beside the figures of
    the step that broke (None without raw/steps.json)."""
    try:
        with open(path) as source:
            data = json.load(source)
    except (OSError, ValueError):
        return None
    steps = data["steps"]
    held = [s for s in steps if s["held"]]
    broke = next((s for s in steps if not s["held"]), None)
    last = ("the last step that held: step %d, %d listeners (%s)" % (held[-1]["step"], held[-1]["listeners"],
                                                                     step_line(held[-1]))
            if held else "no step held")
    if broke is None:
        return [last, "no step broke the %g ms objective or lost a delivery" % (data["slo_s"] * 1000)]
    return [last, "the step that broke: step %d, %d listeners (%s)" % (broke["step"], broke["listeners"],
                                                                       step_line(broke))]
