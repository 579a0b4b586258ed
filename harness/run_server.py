"""`make run`: serve Chattle in the foreground until Ctrl-C.

One worker runs `python chattle.py` on the in-memory bus. More workers run gunicorn
on the shared Redis bus, with a local redis-server started for it when no --redis is
given, so the multi-worker setup is one command.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

from harness.monitor import Prometheus
from harness.processes import ChattleServer, CleanUp, RedisServer, free_port
from harness.proxy import TRUSTED_PROXY_ENV, in_front
from harness.system_packages import needed, require_or_exit
from instruments.page import REPORTS_ROOT, new_report_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1",
                        help="address to listen on; another host's load workers need one they can reach "
                             "(default %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port on --bind (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="gunicorn workers; more than 1 uses the shared Redis bus (default %(default)s)")
    parser.add_argument("--redis", default=os.environ.get("CHATTLE_REDIS_URL", ""),
                        help="Redis URL of the shared bus; empty with --workers > 1 starts a local redis-server")
    parser.add_argument("--redis-cluster", default=os.environ.get("CHATTLE_REDIS_CLUSTER", ""),
                        help="host:port[,host:port] of a Redis Cluster to share the history through instead "
                             "(`make redis-cluster` starts a local one)")
    parser.add_argument("--monitor", action="store_true",
                        help="also start a Prometheus scraping the server's /metrics every second, on a loopback "
                             "port, its configuration and data in reports/<timestamp>-run/")
    parser.add_argument("--report-root", default=REPORTS_ROOT, help="where --monitor's <timestamp>-run/ goes")
    parser.add_argument("--proxy", default="", choices=("", "nginx"),
                        help="nginx: nginx listens on --bind:--port in front of the server (harness/proxy.py), "
                             "its files in a temporary directory")
    parser.add_argument("--tls", action="store_true",
                        help="with --proxy nginx: TLS ended at nginx, with a CA and a certificate made for the run")
    args = parser.parse_args(argv)
    if args.tls and not args.proxy:
        parser.error("--tls is ended at the proxy: give --proxy nginx too (PROXY=nginx TLS=1)")
    with CleanUp.armed():  # a SIGTERM takes Ctrl-C's way: whatever was started so far is stopped
        try:
            return serve(args)
        except KeyboardInterrupt:
            return 130


def serve(args):
    require_or_exit(needed(["run"], workers=args.workers, redis=args.redis, redis_cluster=args.redis_cluster,
                           monitor=args.monitor, proxy=args.proxy), "run")
    if args.redis_cluster:
        return serve_on_cluster(args)

    redis = None
    redis_url = args.redis
    if args.workers > 1 and not redis_url:
        redis = RedisServer()
        redis_url = redis.url
        print("run: started redis-server (pid %d) on %s, data in %s" % (redis.pid, redis_url, redis.workdir))
    proxy = None
    try:
        if args.proxy:  # the server on loopback, nginx on --bind:--port in front of it
            server = ChattleServer(port=free_port(), workers=args.workers, redis_url=redis_url or None, log_path="-",
                                   env=TRUSTED_PROXY_ENV)
            proxy = in_front(server, tempfile.mkdtemp(prefix="chattle-nginx-"), tls=args.tls, port=args.port,
                             bind=args.bind)
        else:
            server = ChattleServer(port=args.port, workers=args.workers, redis_url=redis_url or None, log_path="-",
                                   bind=args.bind)
    except BaseException:
        for started in (locals().get("server"), redis):
            if started is not None:
                started.stop()  # what was started for this run must not outlive it
        raise
    print("run: chattle on %s/ (%s, pid %d); open it in two browser windows. Ctrl-C stops."
          % (server.url, "gunicorn x%d" % args.workers if server.gunicorn else "python chattle.py", server.pid))
    if proxy is not None:
        print("run: nginx (pid %d) on %s/ in front of it, configuration %s%s"
              % (proxy.pid, proxy.url, proxy.config_path,
                 "; its certificate's CA: %s" % proxy.certificates.ca if proxy.certificates else ""))
    try:
        return wait_for_the_end(server, proxy, args.monitor and args.report_root)
    finally:
        if redis is not None:
            redis.stop()
        if proxy is not None:
            shutil.rmtree(proxy.directory, ignore_errors=True)


def serve_on_cluster(args):
    server = ChattleServer(port=args.port, workers=args.workers, env={"CHATTLE_REDIS_CLUSTER": args.redis_cluster},
                           log_path="-", bind=args.bind)
    print("run: chattle on %s/ (%s on the Redis Cluster at %s, pid %d). Ctrl-C stops."
          % (server.url, "gunicorn x%d" % args.workers if server.gunicorn else "python chattle.py",
             args.redis_cluster, server.pid))
    return wait_for_the_end(server, monitor=args.monitor and args.report_root)


def start_prometheus(server, report_root):
    host, port = server.url.split("//", 1)[1].rsplit(":", 1)
    target = "%s:%s" % ("127.0.0.1" if host in ("0.0.0.0", "::") else host, port)
    folder = new_report_dir("run", root=report_root)
    watcher = Prometheus(target, os.path.join(folder, "prometheus"))
    print("run: prometheus on %s/ scraping %s/metrics every second (pid %d; config %s); try chattle_held_polls"
          % (watcher.url, server.url, watcher.pid, watcher.config_path))
    return watcher


def wait_for_the_end(server, proxy=None, monitor=None):
    """Until the server or the proxy in front of it ends, or Ctrl-C; `monitor`: the report root of
    a Prometheus watching the server meanwhile."""
    died = None
    watcher = None
    try:
        if monitor:
            watcher = start_prometheus(server, monitor)
        while died is None:
            died = next((started for started in (server, proxy) if started is not None and not started.alive()), None)
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if watcher is not None:
            watcher.stop()
        if proxy is not None:
            proxy.stop()
        code = server.stop()
    if died is server:
        print("run: the server exited by itself (code %s); its output is above" % code, file=sys.stderr)
        return 1
    if died is not None and died is proxy:
        print("run: nginx exited by itself (code %s):\n%s" % (proxy.popen.returncode, proxy.log_tail()),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
