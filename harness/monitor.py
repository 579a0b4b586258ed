"""A real Prometheus (Debian's package) scraping a Chattle server's /metrics, on a loopback
port, with its configuration and data in a folder of the run's: `make run MONITOR=1`, and
the test that reads the held-poll count back through its HTTP API.
"""

import json
import os
import urllib.parse
import urllib.request

from harness import system_packages
from harness.processes import LOOPBACK, Process, free_port, wait_until

SCRAPE_EVERY = "1s"
CONFIG_NAME = "prometheus.yml"


def config_text(target, every=SCRAPE_EVERY):
    """The configuration: one job scraping `target` (host:port) every `every`."""
    return ("# written for this run by harness/monitor.py\n"
            "global:\n"
            "  scrape_interval: %s\n"
            "  scrape_timeout: %s\n"
            "scrape_configs:\n"
            "  - job_name: chattle\n"
            "    metrics_path: /metrics\n"
            "    static_configs:\n"
            "      - targets: [%s]\n" % (every, every, json.dumps(target)))


class Prometheus(Process):
    """Prometheus scraping `target` (host:port) every second; its config and its data in `folder`."""

    def __init__(self, target, folder, port=None):
        exe = system_packages.find("prometheus")
        if exe is None:
            raise system_packages.MissingProgram(["prometheus"])
        os.makedirs(folder, exist_ok=True)
        self.config_path = os.path.join(folder, CONFIG_NAME)
        with open(self.config_path, "w") as config:
            config.write(config_text(target))
        self.port = port or free_port()
        self.url = "http://%s:%d" % (LOOPBACK, self.port)
        argv = [exe, "--config.file=" + self.config_path, "--storage.tsdb.path=" + os.path.join(folder, "data"),
                "--web.listen-address=%s:%d" % (LOOPBACK, self.port), "--storage.tsdb.retention.time=1d"]
        super().__init__(argv, cwd=folder, log_path=os.path.join(folder, "prometheus.log"))
        try:
            wait_until(self.ready, 60, "prometheus on %s" % self.url, self)
        except BaseException:
            self.stop()
            raise

    def ready(self):
        with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as answer:
            return answer.status == 200

    def query(self, expression):
        return query(self.url, expression)


def query(prometheus_url, expression):
    """The value of an instant query with one series (a float), or None while it has none."""
    url = prometheus_url + "/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=5) as answer:
        body = json.loads(answer.read())
    if body.get("status") != "success" or not body["data"]["result"]:
        return None
    return float(body["data"]["result"][0]["value"][1])
