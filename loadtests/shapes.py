"""The LoadTestShape that plays the stage table of loadtests/scenario.py."""

from locust import LoadTestShape

from loadtests.scenario import SETTLE_SECONDS, build_stages, stage_at


class StagedShape(LoadTestShape):
    """Plays the stage table built from the run's options. After the last stage it keeps
    zero users until every worker reports all its listeners ended (caught up, ledgers
    sent), at most SETTLE_SECONDS; then None ends the run. Ending at once would cut
    off listeners still catching up, and their messages would look lost."""

    stages = None
    run_tally = None     # the master's RunTally, set by the locustfile

    def tick(self):
        if self.stages is None:
            options = self.runner.environment.parsed_options
            self.stages = build_stages(options.listeners, options.posters, options.run_seconds, options.spawn_rate,
                                       options.stop_rate)
        elapsed = self.get_run_time()
        stage = stage_at(self.stages, elapsed)
        if stage is not None:
            return stage["users"], stage["spawn_rate"]
        last = self.stages[-1]
        if elapsed < last["end"] + SETTLE_SECONDS and self.run_tally is not None and not self.run_tally.drained():
            return 0, last["spawn_rate"]
        return None
