"""The LoadTestShape that plays the stage table of loadtests/scenario.py."""

from locust import LoadTestShape

from loadtests.scenario import build_stages, stage_at


class StagedShape(LoadTestShape):
    """Plays the stage table built from the run's options; None after the last stage ends the run."""

    stages = None

    def tick(self):
        if self.stages is None:
            options = self.runner.environment.parsed_options
            self.stages = build_stages(options.listeners, options.posters, options.run_seconds, options.spawn_rate)
        stage = stage_at(self.stages, self.get_run_time())
        if stage is None:
            return None
        return stage["users"], stage["spawn_rate"]
