"""nginx with Nchan, the C peer of `make bench` and `make capacity`: its configuration, written
into the run's own folder, and the server started from it as a child process.

One worker process holds every poll, as one Chattle worker does; the master only starts and
stops it, so the figures (RSS, CPU, held polls) are the worker's alone. Its descriptor limit
(`worker_rlimit_nofile`, and `worker_connections`) is the one every other server of the run
inherits: this process's open-file limit when the server starts. A channel per room keeps
as many messages as Chattle's history (CHATTLE_HISTORY's default, 500), none of them expiring.

    GET  /rooms/<room>/sub   a long-poll subscriber (its place: Last-Modified and Etag, sent
                             back as If-Modified-Since and If-None-Match)
    POST /rooms/<room>/pub   a publisher: the body is the message every subscriber gets
    GET  /stats              nchan_stub_status (held polls: its `subscribers:` line)
    GET  /health             200 once nginx answers
"""

import os
import resource
import shutil

from chattle_limits import POLL_TIMEOUT_MAX
from harness import system_packages
from harness.processes import LOOPBACK, Process, answers_health, child_pids, free_port, wait_until

HISTORY = 500           # Chattle's --history default: messages kept per room
ROOM_PATTERN = "[A-Za-z0-9_-]{1,64}"  # Chattle's room names
BACKLOG = 4096          # as deep as Chattle's and the aiohttp peers'
CONFIG_NAME = "nginx.conf"
STUB_FIELD = b"subscribers:"


def descriptor_limit():
    """The open-file limit the servers of this run inherit (the soft limit, as raised)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def config_text(run_dir, port, descriptors, module=None, host=LOOPBACK, history=HISTORY,
                poll_timeout=POLL_TIMEOUT_MAX):
    """The nginx.conf of one run: everything it writes (pid, logs, temporary bodies) in `run_dir`."""
    module = module or system_packages.PROGRAMS["nchan"][0]
    temp = os.path.join(run_dir, "temp")
    return "\n".join([
        "load_module %s;" % module,
        "daemon off;",
        # the master only starts and stops the one worker: the worker's figures are the server's
        "master_process on;",
        "worker_processes 1;",
        "worker_rlimit_nofile %d;" % descriptors,
        "pid %s;" % os.path.join(run_dir, "nginx.pid"),
        "error_log %s warn;" % os.path.join(run_dir, "error.log"),
        "events {",
        "    worker_connections %d;" % descriptors,
        "}",
        "http {",
        "    access_log off;",
        "    client_body_temp_path %s/body;" % temp,
        "    proxy_temp_path %s/proxy;" % temp,
        "    fastcgi_temp_path %s/fastcgi;" % temp,
        "    uwsgi_temp_path %s/uwsgi;" % temp,
        "    scgi_temp_path %s/scgi;" % temp,
        # a held poll is a keep-alive request: nginx must not end the connection before Nchan does
        "    keepalive_timeout %ds;" % (poll_timeout + 15),
        "    nchan_message_buffer_length %d;" % history,
        "    nchan_message_timeout 0;",  # Chattle's history does not expire either
        "    server {",
        "        listen %s:%d backlog=%d;" % (host, port, BACKLOG),
        "        location ~ \"^/rooms/(%s)/sub$\" {" % ROOM_PATTERN,
        "            nchan_subscriber longpoll;",
        "            nchan_channel_id $1;",
        "            nchan_subscriber_first_message -1;",
        "            nchan_subscriber_timeout %ds;" % poll_timeout,
        "        }",
        "        location ~ \"^/rooms/(%s)/pub$\" {" % ROOM_PATTERN,
        "            nchan_publisher http;",
        "            nchan_channel_id $1;",
        "        }",
        "        location = /stats {",
        "            nchan_stub_status;",
        "        }",
        "        location = /health {",
        "            default_type application/json;",
        "            return 200 '{\"status\":\"ok\"}';",
        "        }",
        "    }",
        "}",
        ""])


def held_subscribers(stub_status):
    """The `subscribers:` figure of nchan_stub_status's text (bytes), or None."""
    for line in stub_status.splitlines():
        if line.startswith(STUB_FIELD):
            return int(line.split(b":", 1)[1])
    return None


class NchanServer(Process):
    """nginx (one worker) with Nchan on a loopback port, from a config written into `run_dir`."""

    def __init__(self, run_dir, port=None, log_path=None, descriptors=None):
        system_packages.require(["nginx", "nchan"])
        self.port = port or free_port()
        self.url = "http://%s:%d" % (LOOPBACK, self.port)
        self.run_dir = run_dir
        os.makedirs(os.path.join(run_dir, "temp"), exist_ok=True)
        self.config = os.path.join(run_dir, CONFIG_NAME)
        with open(self.config, "w") as out:
            out.write(config_text(run_dir, self.port, descriptors or descriptor_limit()))
        argv = [system_packages.find("nginx"), "-p", run_dir, "-c", self.config,
                "-e", os.path.join(run_dir, "error.log")]
        super().__init__(argv, log_path=log_path or os.path.join(run_dir, "nginx.log"))
        try:
            wait_until(self.healthy, 30, "nginx with Nchan on %s" % self.url, self)
            wait_until(lambda: len(self.worker_pids()) == 1, 30, "nginx's worker", self)
        except BaseException:
            self.stop()
            raise

    def healthy(self):
        return answers_health(self.url)

    def worker_pids(self):
        """The worker's pid: what holds the polls; the master is not counted."""
        return child_pids(self.pid)

    def stop(self, grace=10.0):
        # SIGTERM is nginx's fast shutdown: the master ends its worker and exits, as any server's stop
        code = super().stop(grace)
        shutil.rmtree(os.path.join(self.run_dir, "temp"), ignore_errors=True)
        return code

