"""nginx in front of Chattle: its configuration, written from the limits the server keeps
(chattle_limits.py, chattle_http.py), and nginx run in the foreground as a child process.

    python -m harness.proxy --upstream 127.0.0.1:8080 --listen 0.0.0.0:80     # print a configuration

docs/deploy.md shows what this prints (tests/harness/test_proxy.py holds the page to it),
and `make run PROXY=nginx`, `make load PROXY=nginx` and the tests start nginx on it. Each
line that matters to a long poll fails quietly when it is wrong, which is why it is here:

- `proxy_buffering off`: a buffered answer reaches the client only when nginx's buffer
  fills or the upstream closes, so a woken poll would wait;
- `proxy_read_timeout` above the longest poll (PROXY_TIMEOUT): nginx's 60 s default is
  the protocol's longest hold, and the poll would end in a 504 just as it is answered;
- upstream keep-alive (`keepalive`, HTTP/1.1, an empty Connection header): without it
  every poll opens a connection to the server, and its kept connections outlive neither
  side's idle deadline (the server closes after its keepalive_timeout, so nginx forgets
  them sooner);
- the client's address in X-Real-IP and X-Forwarded-For, set (not appended to), so the
  server started with `--trusted-proxy <nginx's address>` counts real clients against
  --max-polls-per-address, and a client's own header never reaches it;
- the request limits the server enforces (body, request line, head), refused at nginx.
"""

import argparse
import os
import signal
import socket
import sys

from chattle_http import LIMIT_SETTINGS
from chattle_limits import BODY_READ_TIMEOUT, MAX_BODY_BYTES, PROXY_TIMEOUT
from harness import system_packages
from harness.processes import LOOPBACK, Process, free_port, get_json, wait_until

HTTP_LIMITS = {name: default for name, _env, _kind, default, _help in LIMIT_SETTINGS}
# Idle upstream connections each nginx worker keeps. A held poll keeps its connection busy,
# so nginx opens one per held poll whatever this is; this bounds only those left idle once
# a fan-out has answered them (each ready for the next poll).
UPSTREAM_IDLE_KEPT = 1024
# nginx forgets an idle upstream connection this much before the server would close it: a
# request sent into a connection the server is closing could be lost.
UPSTREAM_IDLE_MARGIN = 2
CONNECT_TIMEOUT = 5
DESCRIPTORS_SPARE = 100       # nginx's listeners, logs, pipes


def nginx_config(upstream, listen, connections=10000, worker_processes=1, tls=None, limits=None,
                 temp_root="temp"):
    """The text of nginx.conf for nginx in front of the server at `upstream` ("host:port"),
    listening on `listen` ("host:port"), with TLS when `tls` is (certificate, key) paths;
    `connections`: client connections to admit at once (each held poll also holds one to
    the server); `limits`: the server's HTTP limits where not its defaults (chattle_http's
    LIMIT_SETTINGS). Relative paths are nginx's prefix (-p)."""
    limits = dict(HTTP_LIMITS, **(limits or {}))
    head_buffers = max(1, limits["max_head_bytes"] // limits["max_line_bytes"])
    per_worker = 2 * -(-connections // worker_processes) + DESCRIPTORS_SPARE
    lines = [
        "# Written by harness/proxy.py from the server's limits: edit those, not this.",
        "worker_processes %d;" % worker_processes,
        "worker_rlimit_nofile %d;" % (per_worker + DESCRIPTORS_SPARE),
        "pid nginx.pid;",
        "error_log error.log warn;",
        "",
        "events {",
        "    worker_connections %d;  # a client's and the server's connection per held poll" % per_worker,
        "}",
        "",
        "http {",
        "    access_log off;",
        "    server_tokens off;",
        "    client_body_temp_path %s/body;" % temp_root,
        "    proxy_temp_path %s/proxy;" % temp_root,
        "    fastcgi_temp_path %s/fastcgi;" % temp_root,
        "    uwsgi_temp_path %s/uwsgi;" % temp_root,
        "    scgi_temp_path %s/scgi;" % temp_root,
        "",
        "    upstream chattle {",
        "        server %s;" % upstream,
        "        keepalive %d;" % UPSTREAM_IDLE_KEPT,
        "        keepalive_timeout %ds;  # under the server's --keepalive-timeout"
        % max(1, int(limits["keepalive_timeout"]) - UPSTREAM_IDLE_MARGIN),
        "        keepalive_requests 1000000;",
        "    }",
        "",
        "    server {",
        "        listen %s%s;" % (listen, " ssl" if tls else ""),
    ]
    if tls:
        lines += ["        ssl_certificate %s;" % tls[0],
                  "        ssl_certificate_key %s;" % tls[1],
                  "        ssl_protocols TLSv1.2 TLSv1.3;",
                  "        ssl_session_cache shared:chattle:10m;"]
    lines += [
        "        # the server's own limits, refused here before they cost it anything",
        "        client_max_body_size %d;" % MAX_BODY_BYTES,
        "        client_body_timeout %gs;" % BODY_READ_TIMEOUT,
        "        client_header_timeout %gs;" % limits["head_timeout"],
        "        client_header_buffer_size 1k;",
        "        large_client_header_buffers %d %d;  # request line and each header <= --max-line-bytes, "
        "the head <= --max-head-bytes" % (head_buffers, limits["max_line_bytes"]),
        "        keepalive_timeout %gs;" % limits["keepalive_timeout"],
        "        # a held poll is quiet until it is answered: every deadline above the longest poll",
        "        send_timeout %ds;" % PROXY_TIMEOUT,
        "",
        "        location / {",
        "            proxy_pass http://chattle;",
        "            proxy_http_version 1.1;",
        "            proxy_set_header Connection \"\";",
        "            proxy_set_header Host $http_host;",
        "            proxy_set_header X-Real-IP $remote_addr;",
        "            proxy_set_header X-Forwarded-For $remote_addr;",
        "            proxy_set_header X-Forwarded-Proto $scheme;",
        "            proxy_buffering off;",
        "            proxy_connect_timeout %ds;" % CONNECT_TIMEOUT,
        "            proxy_read_timeout %ds;" % PROXY_TIMEOUT,
        "            proxy_send_timeout %ds;" % PROXY_TIMEOUT,
        "        }",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


class NginxProxy(Process):
    """Debian's nginx in the foreground (`daemon off`), its prefix, configuration, pid and
    logs in `directory`, in front of the server at `upstream_url`; with `certificates` (a
    harness.tls.RunCertificates) it ends TLS. `url` is where clients reach it."""

    def __init__(self, upstream_url, directory, connections=10000, certificates=None, port=None, own_session=False,
                 limits=None, worker_processes=1, bind=LOOPBACK):
        exe = system_packages.find("nginx")
        if exe is None:
            raise system_packages.MissingProgram(["nginx"])
        self.directory = os.path.abspath(directory)
        self.bind = bind
        self.port = port or free_port(bind)
        self.url = "%s://%s:%d" % ("https" if certificates else "http", bind, self.port)
        self.certificates = certificates
        for part in ("temp", "logs"):
            os.makedirs(os.path.join(self.directory, part), exist_ok=True)
        upstream = upstream_url.split("://", 1)[-1].rstrip("/")
        self.config_path = os.path.join(self.directory, "nginx.conf")
        with open(self.config_path, "w") as config:
            config.write(nginx_config(upstream, "%s:%d" % (bind, self.port), connections, worker_processes,
                                      (certificates.cert, certificates.key) if certificates else None, limits))
        self.error_log = os.path.join(self.directory, "error.log")
        argv = [exe, "-p", self.directory + "/", "-c", self.config_path, "-e", self.error_log,
                "-g", "daemon off;"]
        super().__init__(argv, cwd=self.directory, log_path=os.path.join(self.directory, "nginx.out"),
                         own_session=own_session)
        try:
            wait_until(self.listening, 15, "nginx on port %d" % self.port, self)
        except BaseException:
            self.stop()
            raise

    def listening(self):
        with socket.create_connection((self.bind, self.port), timeout=1):
            return True

    def pids(self):
        """The master and its workers: nginx's share of CPU, memory and descriptors."""
        import psutil
        try:
            return [self.pid] + [child.pid for child in psutil.Process(self.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def worker_pids(self):
        import psutil
        try:
            return [child.pid for child in psutil.Process(self.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def healthy(self):
        status, _body = get_json(self.url + "/health", timeout=2, ca_file=self.certificates and self.certificates.ca)
        return status == 200

    def log_tail(self, lines=30):
        tail = super().log_tail(lines)
        if os.path.exists(self.error_log):
            with open(self.error_log, "rb") as log:
                tail += "\n" + b"\n".join(log.read().splitlines()[-lines:]).decode("utf-8", "replace")
        return tail


# What the server behind nginx is told: nginx reaches it from loopback, and only there is
# X-Forwarded-For believed.
TRUSTED_PROXY_ENV = {"CHATTLE_TRUSTED_PROXY": LOOPBACK}


def in_front(server, directory, tls=False, connections=10000, own_session=False, port=None, bind=LOOPBACK):
    """nginx started in front of `server` (a ChattleServer started with TRUSTED_PROXY_ENV),
    its files in `directory`; with `tls`, a CA and a certificate made for it there first."""
    certificates = None
    if tls:
        from harness.tls import make_certificates
        certificates = make_certificates(os.path.join(directory, "tls"))
    return NginxProxy(server.url, directory, connections, certificates, port=port, own_session=own_session,
                      bind=bind)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", default="127.0.0.1:8080", help="host:port of the server (default %(default)s)")
    parser.add_argument("--listen", default="127.0.0.1:8000", help="host:port nginx listens on (default %(default)s)")
    parser.add_argument("--connections", type=int, default=10000,
                        help="client connections nginx admits at once (default %(default)s)")
    parser.add_argument("--worker-processes", type=int, default=1, help="nginx workers (default %(default)s)")
    parser.add_argument("--tls-cert", default="", help="certificate chain (PEM): listen with TLS")
    parser.add_argument("--tls-key", default="", help="the certificate's key (PEM)")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    sys.stdout.write(nginx_config(args.upstream, args.listen, args.connections, args.worker_processes,
                                  (args.tls_cert, args.tls_key) if args.tls_cert else None))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends it quietly
    sys.exit(main())
