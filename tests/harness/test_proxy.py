"""nginx in front of Chattle, for real: Debian's nginx on the configuration harness/proxy.py
writes, a real Chattle behind it (gunicorn for TLS, as deployed), TLS with a CA made for
the test, and the load client over it. No sleeps: every wait is on a condition, bounded."""

import contextlib
import glob
import io
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time

import gevent
import psutil
import pytest

from chattle_limits import CLIENT_TIMEOUT_MARGIN, MAX_BODY_BYTES, POLL_TIMEOUT_MAX, PROXY_TIMEOUT, client_timeout
from harness import system_packages
from harness.processes import ROOT, free_port, get_json, post_json
from harness.proxy import TRUSTED_PROXY_ENV, NginxProxy, in_front, main, nginx_config
from harness.tls import make_certificates
from loadtests import longpoll
from loadtests.longpoll import HeldPolls, LongPollClient

DEPLOY_DOC = os.path.join(ROOT, "docs", "deploy.md")


@pytest.fixture(scope="module")
def nginx(cannot_run):
    if system_packages.find("nginx") is None:
        cannot_run(system_packages.missing_line(["nginx"]))


def _until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        gevent.sleep(0.02)
    return condition()


def _exchange(address, request, source="127.0.0.1", timeout=20.0):
    """One raw HTTP/1.1 request from `source`; (status, body) of its answer."""
    with socket.create_connection(address, timeout=timeout, source_address=(source, 0)) as conn:
        conn.sendall(request)
        return _answer(conn)


def _answer(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the head: %r" % data)
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        body += chunk
    return int(head.split()[1]), json.loads(body)


def _poll_request(room, since, timeout, forwarded=None):
    extra = "X-Forwarded-For: %s\r\n" % forwarded if forwarded else ""
    return ("GET /rooms/%s/msgs?since=%d&timeout=%g HTTP/1.1\r\nHost: t\r\n%s\r\n"
            % (room, since, timeout, extra)).encode()


# -- the configuration ---------------------------------------------------------------------------

def test_the_configuration_holds_every_poll_unbuffered_on_kept_connections_within_the_servers_limits(nginx, tmp_path):
    text = nginx_config("127.0.0.1:8080", "127.0.0.1:8000")
    settings = dict(re.findall(r"^\s*(\w+) ([^;]*);", text, re.M))
    assert POLL_TIMEOUT_MAX < PROXY_TIMEOUT < client_timeout(POLL_TIMEOUT_MAX)
    for name in ("proxy_read_timeout", "proxy_send_timeout", "send_timeout"):
        assert settings[name] == "%ds" % PROXY_TIMEOUT, name          # nginx's default, 60 s, cuts the longest
    assert settings["proxy_buffering"] == "off"
    assert settings["proxy_http_version"] == "1.1"
    assert 'proxy_set_header Connection "";' in text and re.search(r"^\s*keepalive \d+;", text, re.M)
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in text   # set, never appended to
    assert settings["client_max_body_size"] == str(MAX_BODY_BYTES)
    assert settings["large_client_header_buffers"] == "4 8192"         # --max-head-bytes / --max-line-bytes
    assert int(re.search(r"keepalive_timeout (\d+)s;", text).group(1)) < 10   # under the server's own
    # nginx itself accepts it, as written for TLS too
    certificates = make_certificates(str(tmp_path / "tls"))
    (tmp_path / "temp").mkdir()
    path = tmp_path / "nginx.conf"
    path.write_text(nginx_config("127.0.0.1:8080", "127.0.0.1:8000", tls=(certificates.cert, certificates.key)))
    checked = subprocess.run([system_packages.find("nginx"), "-t", "-p", str(tmp_path) + "/", "-c", str(path),
                              "-e", str(tmp_path / "error.log")], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr


def test_the_deploy_page_shows_what_the_generator_writes():
    """docs/deploy.md's nginx block is the generator's output for the command written above it."""
    with open(DEPLOY_DOC) as page:
        text = page.read()
    found = re.search(r"python -m harness\.proxy ([^\n`]*)`?\n\n((?:    [^\n]*\n|\n)+)", text)
    assert found, "docs/deploy.md has no `python -m harness.proxy ...` followed by its configuration"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(found.group(1).split())
    shown = "\n".join(line[4:] for line in found.group(2).rstrip("\n").split("\n")) + "\n"
    assert shown == printed.getvalue()


# -- plain http: forwarding, timeouts, keep-alive, the client's address ---------------------------

@pytest.fixture
def behind_nginx(nginx, start_chattle, tmp_path):
    """Factory: (server, nginx) with the server trusting nginx's address, or not."""
    started = []

    def start(trusted=True, args=()):
        server = start_chattle(env=TRUSTED_PROXY_ENV if trusted else {}, extra_args=list(args))
        proxy = NginxProxy(server.url, str(tmp_path / ("nginx-%d" % len(started))))
        started.append(proxy)
        return server, proxy

    yield start
    for proxy in started:
        proxy.stop()


def test_a_held_poll_is_answered_through_nginx_when_the_post_arrives_and_after_the_servers_poll_timeout(
        behind_nginx):
    server, proxy = behind_nginx()
    address = ("127.0.0.1", proxy.port)
    status, body = get_json(proxy.url + "/rooms/via/msgs")
    assert status == 200
    cursor = body["cursor"]
    # held for up to 60 s: answered with the message, so nginx passed it on at the post, not at an end
    with socket.create_connection(address, timeout=client_timeout(POLL_TIMEOUT_MAX)) as conn:
        conn.sendall(_poll_request("via", cursor, POLL_TIMEOUT_MAX))
        assert _until(lambda: get_json(server.url + "/stats")[1]["waiters"] == 1)
        assert post_json(proxy.url + "/rooms/via/msgs", {"from": "t", "content": "through"})[0] == 201
        conn.settimeout(CLIENT_TIMEOUT_MARGIN)    # far under the poll's 60 s: only the post can answer it
        status, body = _answer(conn)
    assert status == 200 and [message["content"] for message in body["messages"]] == ["through"]
    # the server's own timeout ends a poll through nginx as straight: an empty 200, not nginx's 504
    status, body = _exchange(address, _poll_request("via", body["cursor"], 0.5))
    assert status == 200 and body["messages"] == []


def test_polls_through_nginx_reuse_one_upstream_connection(behind_nginx):
    """Ten polls, each on a client connection of its own, one after the other: the server
    sees one connection from nginx, the same for all (a new one per poll without keep-alive)."""
    server, proxy = behind_nginx()
    upstream_ports = []
    for _ in range(10):
        status, _body = _exchange(("127.0.0.1", proxy.port), _poll_request("kept", 0, 0))
        assert status == 200
        upstream_ports.append(sorted(conn.raddr.port for conn in psutil.Process(server.pid).net_connections("tcp")
                                     if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == server.port))
    assert len(upstream_ports[0]) == 1 and upstream_ports == [upstream_ports[0]] * 10


@pytest.mark.parametrize("trusted", [True, False])
def test_polls_per_address_count_the_clients_behind_a_trusted_proxy_and_a_header_from_elsewhere_is_ignored(
        behind_nginx, trusted):
    server, proxy = behind_nginx(trusted=trusted, args=["--max-polls-per-address", "1"])
    via_proxy, direct = ("127.0.0.1", proxy.port), ("127.0.0.1", server.port)
    cursor = get_json(server.url + "/rooms/per/msgs")[1]["cursor"]
    holding = []
    try:
        def hold(address, source, forwarded=None):
            conn = socket.create_connection(address, timeout=10, source_address=(source, 0))
            holding.append(conn)
            waiters = get_json(server.url + "/stats")[1]["waiters"]
            conn.sendall(_poll_request("per", cursor, 30, forwarded))
            assert _until(lambda: get_json(server.url + "/stats")[1]["waiters"] == waiters + 1)

        hold(via_proxy, "127.0.0.2")
        second = _poll_request("per", cursor, 30)
        if trusted:       # another client behind nginx holds a poll of its own
            hold(via_proxy, "127.0.0.3")
        else:             # nginx's address for both: the second is one too many
            assert _exchange(via_proxy, second, source="127.0.0.3")[0] == 429
        # a client that writes the header itself through nginx is still counted as itself
        assert _exchange(via_proxy, _poll_request("per", cursor, 30, "10.1.1.1"), source="127.0.0.2")[0] == 429
        # a peer that is not the proxy is not believed: two polls from 127.0.0.5 under two names
        hold(direct, "127.0.0.5", forwarded="10.2.2.2")
        assert _exchange(direct, _poll_request("per", cursor, 30, "10.3.3.3"), source="127.0.0.5")[0] == 429
    finally:
        for conn in holding:
            conn.close()


# -- TLS: nginx in front of gunicorn, the load client checking the run's CA ----------------------

@pytest.fixture(scope="module")
def tls_gunicorn(nginx, tmp_path_factory):
    from harness.processes import ChattleServer
    directory = tmp_path_factory.mktemp("tls-front")
    server = ChattleServer(gunicorn=True, env=TRUSTED_PROXY_ENV, log_path=str(directory / "gunicorn.log"))
    try:
        proxy = in_front(server, str(directory / "nginx"), tls=True)
    except BaseException:
        server.stop()
        raise
    yield server, proxy
    proxy.stop()
    server.stop()


def test_held_polls_over_tls_are_answered_at_the_post_and_stamped_at_the_encrypted_bytes_arrival(
        tls_gunicorn, monkeypatch):
    _server, proxy = tls_gunicorn
    monkeypatch.setattr(longpoll, "ca_file", proxy.certificates.ca)
    answers, failures = {}, []
    polls = HeldPolls(None, answer_deadline=20, log_answers=lambda count, length: None,
                      in_order_run=lambda body: None, on_runs=lambda *args: None)

    def listener(number):
        def on_answer(reply):
            body = json.loads(reply.body)
            answers.setdefault(number, []).append((body, reply))
            return None if body["messages"] else body["cursor"]
        return on_answer
    for number in range(10):
        polls.hold(LongPollClient(proxy.url), "/rooms/tls/msgs?since=", None, "&timeout=15", listener(number),
                   failures.append, "/rooms/tls/msgs", "poll (first)")
    assert _until(lambda: len(answers) == 10), failures
    assert not polls.compiled                       # the compiled path frames plain bytes only
    poster = LongPollClient(proxy.url)
    assert poster.post("/rooms/tls/msgs", b'{"from": "t", "content": "sealed"}').status == 201
    assert _until(lambda: len(polls) == 0), failures
    poster.close()
    assert failures == []
    last = [answers[number][-1] for number in range(10)]
    assert all(body["messages"][0]["content"] == "sealed" for body, _reply in last)
    assert all(reply.stamped and reply.arrived_at <= reply.read_at for _body, reply in last)


def test_a_certificate_no_given_ca_vouches_for_is_refused_in_one_line(tls_gunicorn, tmp_path, capsys, monkeypatch):
    _server, proxy = tls_gunicorn
    stranger = make_certificates(str(tmp_path / "stranger"))
    with pytest.raises(ssl.SSLCertVerificationError):
        LongPollClient(proxy.url, timeout=5).get("/health")     # the system's CAs do not know the run's
    from loadtests import run
    code = run.main(["--host", proxy.url, "--ca-file", stranger.ca, "--users", "1", "--report-root", str(tmp_path)])
    refused = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert refused[1:] == ["  - %s: its certificate is not trusted (unable to get local issuer certificate); give "
                           "the CA that signed it with --ca-file (CA_FILE=)" % proxy.url]
    monkeypatch.setattr(longpoll, "ca_file", proxy.certificates.ca)
    assert LongPollClient(proxy.url, timeout=5).get("/health").status == 200


def test_the_bench_rig_holds_polls_over_tls_and_times_each_answer(tls_gunicorn):
    from bench.rig import Rig
    server, proxy = tls_gunicorn
    point = Rig(proxy.url, room="rig-tls", ca_file=proxy.certificates.ca).run(30, server.worker_pids())
    assert (point["held_confirmed"], point["delivered"], point["complete_listeners"], point["unanswered"]) == \
        (30, 30, 30, 0)


@pytest.mark.long
def test_make_load_against_https_passes_through_nginx_with_tls_in_front_of_gunicorn(tls_gunicorn, tmp_path):
    """`make load HOST=https://... CA_FILE=...` against a deployment this test started: every
    check passes, over TLS, the certificate checked against the deployment's CA."""
    _server, proxy = tls_gunicorn
    run = subprocess.run([sys.executable, "-m", "loadtests.run", "--host", proxy.url, "--ca-file",
                          proxy.certificates.ca, "--users", "40", "--duration", "24", "--spawn-rate", "50",
                          "--poll-timeout", "5", "--report-root", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(glob.glob(str(tmp_path / "*-load" / "summary.json"))[0]) as summary_file:
        summary = json.load(summary_file)
    assert summary["run"]["tls"] and summary["delivery"]["lost"] == 0 and summary["deliveries"] > 0
    assert {share["held_path"] for share in summary["worker_shares"].values()} == {"tls"}


def test_a_forwarded_header_that_names_no_address_counts_against_the_proxy_and_a_bad_setting_stops_the_start():
    import chattle
    assert chattle.forwarded_address({"HTTP_X_FORWARDED_FOR": "10.0.0.1, 10.0.0.2"}, "127.0.0.1") == "10.0.0.2"
    for header in ("", "x" * 5000, "10.0.0.1, not-an-address", "::ffff:999.1.1.1"):
        assert chattle.forwarded_address({"HTTP_X_FORWARDED_FOR": header}, "127.0.0.1") == "127.0.0.1"
    assert chattle.trusted_proxies(" 127.0.0.1, ::1 ,") == frozenset({"127.0.0.1", "::1"})
    with pytest.raises(SystemExit, match="--trusted-proxy 'nginx' is not an IP address"):
        chattle.Settings(trusted_proxy="nginx")


def test_make_run_with_nginx_and_tls_serves_through_it_and_stops_everything_it_started(nginx, tmp_path):
    """`make run PROXY=nginx TLS=1`'s command: the page's API through nginx over TLS, and on
    Ctrl-C nginx, the server and nginx's directory gone."""
    port = free_port()
    run = subprocess.Popen([sys.executable, "-m", "harness.run_server", "--port", str(port), "--proxy", "nginx",
                            "--tls"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any("nginx (pid" in line for line in lines) and run.poll() is None and len(lines) < 50:
            lines.append(run.stdout.readline())
        said = "".join(lines)
        ca = re.search(r"its certificate's CA: (\S+)", said).group(1)
        pids = [int(pid) for pid in re.findall(r"pid (\d+)", said)]
        assert get_json("https://127.0.0.1:%d/health" % port, ca_file=ca)[0] == 200
        assert post_json("https://localhost:%d/rooms/run/msgs" % port, {"from": "t", "content": "x"},
                         ca_file=ca)[0] == 201
        run.send_signal(signal.SIGINT)
        assert run.wait(30) == 0
        assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        assert not os.path.exists(os.path.dirname(os.path.dirname(ca)))
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)


def test_the_decryption_cost_is_measured_on_real_tls_records_round_after_round(tmp_path):
    from loadtests import tls_cost
    figures = tls_cost.measure(make_certificates(str(tmp_path / "tls")), rounds=2)
    # TLS 1.3 adds its 5-byte header, the content type and a 16-byte tag to each record
    assert figures["record_bytes"] == figures["answer_bytes"] + 22
    assert figures["decrypt_us"] > 0 and figures["frame_us"] > 0 and figures["handshake_us"] > 0
    entry = dict(figures, started=0, commit="0" * 40, dirty=False, machine="m")
    assert "| decrypting it (`ClientTls.decrypt`) |" in "\n".join(tls_cost.section(entry))


def test_over_tls_make_load_reads_with_one_client_process_per_thousand_listeners(tls_gunicorn):
    from loadtests import run
    _server, proxy = tls_gunicorn
    for users, processes in ((500, 1), (2000, 2), (2500, 3)):
        args = run.parse_args(["--host", proxy.url, "--ca-file", proxy.certificates.ca, "--users", str(users)])
        _stages, problems, _notes = run.preflight(args)
        assert problems == [] and args.client_processes == processes
    args = run.parse_args(["--host", proxy.url, "--ca-file", proxy.certificates.ca, "--users", "2000",
                           "--client-processes", "1"])
    run.preflight(args)
    assert args.client_processes == 1      # given, kept
