"""The LoadTestShape that plays the stage table of loadtests/scenario.py."""

import os
import time

from locust import LoadTestShape
from locust.runners import STATE_MISSING

from loadtests.scenario import SETTLE_SECONDS, SHAPE_STARTED_FILE, build_stages, stage_at


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
            self.stages = build_stages(options.listeners, options.posters, options.run_seconds, options.spawn_rate,
                                       options.stop_rate)
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
