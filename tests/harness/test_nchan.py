"""nginx with Nchan, the C peer of `make bench` and `make capacity`: the config written per run
is one nginx accepts, and the rig speaks Nchan's long-poll to the real server, each delivery
checked against the ledger as Chattle's are."""

import os
import subprocess

import psutil
import pytest

from bench.rig import Rig
from bench.wires import NCHAN
from harness import system_packages
from harness.nchan import HISTORY, NchanServer, config_text, held_subscribers
from harness.processes import wait_until

POLLS = 40


def test_the_config_is_one_worker_with_the_runs_descriptor_limit_and_chattles_history(tmp_path):
    text = config_text(str(tmp_path), 8123, descriptors=4321).splitlines()
    for line in ("load_module /usr/lib/nginx/modules/ngx_nchan_module.so;", "daemon off;", "worker_processes 1;",
                 "worker_rlimit_nofile 4321;", "    worker_connections 4321;",
                 "    nchan_message_buffer_length %d;" % HISTORY, "    nchan_message_timeout 0;",
                 "        listen 127.0.0.1:8123 backlog=4096;", "pid %s/nginx.pid;" % tmp_path):
        assert line in text
    assert HISTORY == 500  # chattle.py's --history default, which the peer's buffer matches


def test_nginx_accepts_the_config(tmp_path):
    """`nginx -t`: the module loads and every directive is one this nginx knows."""
    config = tmp_path / "nginx.conf"
    config.write_text(config_text(str(tmp_path), 8123, descriptors=1024))
    (tmp_path / "temp").mkdir()
    done = subprocess.run([system_packages.find("nginx"), "-t", "-p", str(tmp_path), "-c", str(config),
                           "-e", str(tmp_path / "error.log")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "syntax is ok" in done.stderr


def test_the_held_polls_are_read_from_the_stub_status():
    assert held_subscribers(b"channels: 1\nsubscribers: 37\nredis pending commands: 0\n") == 37
    assert held_subscribers(b"channels: 1\n") is None


@pytest.fixture
def nchan(tmp_path):
    server = NchanServer(str(tmp_path / "run"))
    yield server
    server.stop()


def test_a_small_run_through_the_real_nginx_delivers_every_message(nchan):
    worker = nchan.worker_pids()
    assert len(worker) == 1 and worker[0] != nchan.pid  # the one worker, not the master, is measured
    point = Rig(nchan.url, room="small", wire=NCHAN).run(POLLS, server_pids=worker)
    assert (point["parked"], point["held_confirmed"], point["delivered"]) == (POLLS, POLLS, POLLS)
    assert point["complete_listeners"] == POLLS and point["unanswered"] == 0
    assert point["latency"]["count"] == POLLS and point["bytes_per_poll"] is not None
    # a second run starts from the message the first one posted: the position moves on
    rig = Rig(nchan.url, room="small", wire=NCHAN)
    assert NCHAN.sequence(rig.cursor()) == 2
    assert rig.run(5, server_pids=worker)["complete_listeners"] == 5


def test_the_ledger_reads_the_sequence_number_the_poster_put_in_the_body():
    """Nchan delivers the poster's body as it is: its seq is what the ledger checks, and an answer
    that is not such a body (a timeout's empty 304, an error page) is no delivery."""
    assert NCHAN.first_id(b'{"seq":7,"sent":1.5,"from":"rig","content":"wake"}') == 7
    assert NCHAN.first_id(b"") is None and NCHAN.first_id(b"<html>") is None and NCHAN.first_id(b"[]") is None


def test_stop_ends_the_master_and_its_worker(tmp_path):
    server = NchanServer(str(tmp_path / "run"))
    processes = [psutil.Process(pid) for pid in [server.pid] + server.worker_pids()]
    assert os.path.exists(server.config)
    server.stop()
    wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes), 10,
               "nginx's master and worker gone")
