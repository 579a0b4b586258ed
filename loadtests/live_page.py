"""`make load UI=1`: Locust's web page, extended through its public hooks with a tab of the
run's own figures, live: the polls the servers hold (their /metrics), the listeners, the
deliveries and deliveries per second, and the wake-up percentiles, from the same tallies
the report is made of (merged on the master from every worker's reports). Locust's own
tables and charts show each delivery too (`events.request` fires for it).

The page's Stop ends the run the way Ctrl-C ends a headless one (the shape's
request_stop: every listener is stopped, catches up and reports); once the test has
stopped, by the page or at the end of the stage table, the master quits as a headless run
does, so the orchestrator writes the same checks and the same report.
"""

import json
import time
import urllib.request

import gevent
from flask import jsonify
from flask import request as page_request

TAB = "chattle"
HELD_METRIC = "chattle_held_polls"
SERVER_ASK_EVERY = 1.0  # seconds: a page refreshing often asks the servers no more often than this
SERVER_TIMEOUT = 2.0


def held_polls_of(url):
    """The polls a Chattle deployment holds, summed over its workers, from its /metrics (None
    when it does not answer one)."""
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=SERVER_TIMEOUT) as answer:
        text = answer.read(1024 * 1024).decode("utf-8", "replace")
    for line in text.splitlines():
        name, _space, value = line.partition(" ")
        if name == HELD_METRIC:
            return int(float(value))
    return None


class LiveFigures:
    """The rows of the tab, from the run's tally and the servers."""

    def __init__(self, run, servers, clock=time.monotonic):
        self.run, self.servers, self.clock = run, servers, clock
        self.held, self.held_at = None, None
        self.rate_from = None  # (when, deliveries) the rate is taken from
        self.rate = None

    def server_held_polls(self):
        now = self.clock()
        if self.held_at is None or now - self.held_at >= SERVER_ASK_EVERY:
            self.held_at = now
            try:
                self.held = sum(held_polls_of(url) or 0 for url in self.servers)
            except (OSError, ValueError):
                self.held = None
        return self.held

    def deliveries_per_second(self, deliveries):
        now = self.clock()
        if self.rate_from is None:
            self.rate_from = (now, deliveries)
            return None
        since, before = self.rate_from
        if now - since >= 1.0:  # over a second at least: the workers report every few
            self.rate = (deliveries - before) / (now - since)
            self.rate_from = (now, deliveries)
        return self.rate

    def rows(self):
        workers = self.run.workers.values()
        deliveries = sum(worker.get("deliveries", 0) for worker in workers)
        live = sum(worker.get("listeners_started", 0) - worker.get("listeners_ended", 0) for worker in workers)
        rate = self.deliveries_per_second(deliveries)
        latency = self.run.latency
        rows = [("held polls (the servers' /metrics)", self.server_held_polls()),
                ("listeners running", live),
                ("deliveries", deliveries),
                ("deliveries per second", None if rate is None else round(rate, 1))]
        for name, fraction in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
            seconds = latency.percentile(fraction)
            rows.append(("wake-up %s ms (kernel arrival - ts)" % name,
                         None if seconds is None else round(seconds * 1000, 1)))
        return [{"figure": figure, "value": "-" if value is None else value} for figure, value in rows]


def extend(environment, run, servers, request_stop):
    """Add the tab to `environment`'s web page, and make its Stop end the run as Ctrl-C does."""
    web_ui = environment.web_ui
    figures = LiveFigures(run, servers)
    web_ui.template_args["extended_tabs"] = [{"title": "Chattle live", "key": TAB}]
    web_ui.template_args["extended_tables"] = [
        {"key": TAB, "structure": [{"key": "figure", "title": "Figure"}, {"key": "value", "title": "Now"}]}]

    @web_ui.app.after_request
    def add_live_figures(response):
        if not page_request.path.endswith("/stats/requests") or not response.is_json:
            return response
        body = response.get_json()
        body["extended_stats"] = [{"key": TAB, "data": figures.rows()}]
        response.set_data(json.dumps(body))
        return response

    def stop_as_ctrl_c():
        request_stop()
        return jsonify({"success": True, "message": "Stopping: every listener catches up, then the report"})

    web_ui.app.view_functions["locust.stop"] = stop_as_ctrl_c

    def quit_once_stopped(**_kwargs):
        # as Locust's own --autoquit does after a --run-time; here after any stop
        def quit_now():
            environment.runner.quit()
            web_ui.stop()
        gevent.spawn(quit_now)

    environment.events.test_stop.add_listener(quit_once_stopped)
    return figures
