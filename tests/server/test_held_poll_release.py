"""Held polls do not outlive their clients, and one client address cannot hold unbounded
polls: over real sockets on 127.0.0.1, against `python chattle.py`, gunicorn with one
ChattleWorker (gunicorn.conf.py), and where it applies the seed's `--worker-class gevent`.

A client that resets (RST) or closes (FIN) its connection while its poll is held has it
released within a second (docs/protocol.md); one that sends its next request early keeps
its poll; the (N+1)-th poll held for one address is answered 429.
"""

import socket
import struct

import gevent
import pytest

import chattle
import chattle_http
from clients import Raw, request, settle
from harness.processes import ChattleServer, SeedGunicorn, get_json, wait_until

HELD = 200
RELEASED_WITHIN = 2.0  # seconds; the contract says within one, the rest is this machine's load
CAP = 3
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close sends a reset, not a FIN
EARLY_SMALL = request("GET", "/health")
# Over what the reader takes in while a poll is held (READ_BUFFER_BYTES): the rest waits
# in the kernel, where it keeps the socket readable.
EARLY_LARGE = request("GET", "/health", ["X-Pad: " + "p" * 2 * chattle_http.READ_BUFFER_BYTES])


@pytest.fixture(scope="module", params=["python", "gunicorn", "seed"])
def server(request, tmp_path_factory):
    log_path = str(tmp_path_factory.mktemp("release") / ("%s.log" % request.param))
    if request.param == "seed":
        started = SeedGunicorn(log_path=log_path)
    else:
        started = ChattleServer(gunicorn=request.param == "gunicorn", log_path=log_path)
    started.kind = request.param
    try:
        yield started
    finally:
        started.stop()


def stats(server):
    return get_json(server.url + "/stats")[1]


def figures(server):
    """(waiters, connections, descriptors): gunicorn's own worker counts no connections."""
    now = stats(server)
    return now["waiters"], now["connections"], now["descriptors"]


def hold(server, count, room):
    """`count` clients, each holding a poll on the empty `room`; once the server holds them."""
    baseline = figures(server)
    clients = []
    try:
        for _ in range(count):
            client = Raw(server.port)
            client.sock.sendall(request("GET", "/rooms/%s/msgs?since=0&timeout=60" % room))
            clients.append(client)
        wait_until(lambda: stats(server)["waiters"] >= count, 30, "%d polls held" % count)
    except BaseException:
        for client in clients:
            client.close()
        raise
    return baseline, clients


def released(server, baseline):
    """Wait, bounded, until the server is back at `baseline`; the figures it reached."""
    seen = []

    def back():
        seen[:] = figures(server)
        waiters, connections, descriptors = seen
        return waiters == 0 and connections <= baseline[1] and descriptors <= baseline[2]

    try:
        wait_until(back, RELEASED_WITHIN, "released")
        return
    except RuntimeError:
        pass
    pytest.fail("%.0f s after the clients left: waiters, connections, descriptors %s; before they "
                "came: %s" % (RELEASED_WITHIN, seen, list(baseline)), pytrace=False)


def test_held_polls_whose_clients_reset_are_released(server):
    baseline, clients = hold(server, HELD, "reset")
    for client in clients:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        client.close()
    released(server, baseline)


@pytest.mark.parametrize("how", ["shutdown", "close"])
def test_held_polls_whose_clients_close_are_released(server, how):
    baseline, clients = hold(server, HELD // 2, "fin-" + how)
    try:
        for client in clients:
            if how == "shutdown":
                client.sock.shutdown(socket.SHUT_WR)  # a FIN; the client could still read
            else:
                client.close()
        released(server, baseline)
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("size", ["small", "large"])
def test_a_client_that_sends_its_next_request_early_keeps_its_poll(server, size):
    """Pipelining: the poll is held on and answered, then the early request (read in
    while the poll is held, or over that bound left in the kernel)."""
    since = get_json(server.url + "/rooms/early/msgs")[1]["cursor"]
    client = Raw(server.port)
    try:
        client.sock.sendall(request("GET", "/rooms/early/msgs?since=%d&timeout=60" % since))
        wait_until(lambda: stats(server)["waiters"] >= 1, 30, "the poll held")
        client.sock.sendall(EARLY_SMALL if size == "small" else EARLY_LARGE)
        # once the server answers this, its hub has seen the early bytes stir the poll
        assert stats(server)["waiters"] == 1
        post = request("POST", "/rooms/early/msgs", ["Content-Type: application/json", "Content-Length: 31"],
                       b'{"from": "ann", "content": "x"}')
        poster = Raw(server.port)
        try:
            poster.sock.sendall(post)
            assert poster.answer()[0] == 201
        finally:
            poster.close()
        status, _headers, body = client.answer()
        assert status == 200 and [m["content"] for m in body["messages"]] == ["x"]
        status, _headers, body = client.answer()
        assert status == 200 and body["status"] == "ok"
    finally:
        client.close()


def test_no_client_that_left_left_a_traceback(server):
    log = open(server.log_path, "rb").read()
    assert b"Traceback" not in log, log.decode("utf-8", "replace")[-3000:]


# -- polls held per client address ----------------------------------------------------------

@pytest.fixture(scope="module", params=["python", "gunicorn"])
def capped(request, tmp_path_factory):
    log_path = str(tmp_path_factory.mktemp("capped") / ("%s.log" % request.param))
    started = ChattleServer(gunicorn=request.param == "gunicorn", log_path=log_path,
                            env={"CHATTLE_MAX_POLLS_PER_ADDRESS": str(CAP)})
    try:
        yield started
    finally:
        started.stop()


def test_a_poll_beyond_the_cap_of_its_address_is_429_until_one_ends(capped):
    _baseline, clients = hold(capped, CAP, "capped")
    try:
        over = Raw(capped.port)
        try:
            over.sock.sendall(request("GET", "/rooms/capped/msgs?since=0&timeout=5"))
            status, headers, body = over.answer()
            assert status == 429, (status, body)
            assert over.closed_by_server(10), "a refused poll left its connection open"
        finally:
            over.close()
        assert headers["retry-after"] == "1" and "CHATTLE_MAX_POLLS_PER_ADDRESS" in body["error"]
        assert headers["content-type"].startswith("application/json")
        assert stats(capped)["waiters"] == CAP
        # a poll answered at once is not held, and not refused
        assert get_json(capped.url + "/rooms/capped/msgs?since=0&timeout=0")[0] == 200
        clients[0].sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        clients.pop(0).close()
        wait_until(lambda: stats(capped)["waiters"] == CAP - 1, 30, "one poll released")
        again = Raw(capped.port)
        clients.append(again)
        again.sock.sendall(request("GET", "/rooms/capped/msgs?since=0&timeout=60"))
        wait_until(lambda: stats(capped)["waiters"] == CAP, 30, "a new poll held")
    finally:
        for client in clients:
            client.close()


# -- in process: the table, the setting, and no busy loop on a readable socket -------------

def test_the_table_of_addresses_keeps_only_addresses_with_polls_held():
    rooms = chattle.Rooms(10, max_polls_per_address=2)
    assert rooms.hold_poll("a") and rooms.hold_poll("a") and not rooms.hold_poll("a")
    assert rooms.hold_poll("b")
    rooms.end_poll("a")
    assert rooms.hold_poll("a")
    for address in ("a", "a", "b"):
        rooms.end_poll(address)
    assert rooms.polls_by_address == {}


def test_the_cap_is_a_flag_and_at_least_one():
    assert chattle.parse_args(["--max-polls-per-address", "7"]).max_polls_per_address == 7
    with pytest.raises(SystemExit):
        chattle.Settings(max_polls_per_address=0)


@pytest.mark.parametrize("early, stirs, watched", [(EARLY_SMALL, 1, True), (EARLY_LARGE, 2, False)],
                         ids=["small", "large"])
def test_early_bytes_stir_a_held_poll_a_bounded_number_of_times(app_state, monkeypatch, early, stirs, watched):
    """Bytes a client sends while its poll is held wake the poll once to be read in (or
    once more to find them over the bound and stop watching): a socket that stays
    readable does not wake its held poll again (counted over many turns of the hub).
    While still watched, the client's close then ends the poll."""
    stirred = []
    real = chattle_http.peer_gone

    def counted(peer, watcher):
        stirred.append(1)
        return real(peer, watcher)

    monkeypatch.setattr(chattle_http, "peer_gone", counted)
    server = chattle.make_server("127.0.0.1", 0)
    server.start()
    client = socket.create_connection(("127.0.0.1", server.server_port))
    try:
        client.sendall(request("GET", "/rooms/stir/msgs?since=0&timeout=30"))
        settle(lambda: chattle.rooms.waiters == 1, "the poll parked")
        client.sendall(early)
        settle(lambda: len(stirred) >= stirs, "the poll stirred")
        for _ in range(200):
            gevent.sleep(0)
        assert len(stirred) == stirs and chattle.rooms.waiters == 1
        if watched:
            client.close()
            settle(lambda: chattle.rooms.waiters == 0, "the poll released")
    finally:
        # once unwatched, its close would go unseen until the poll ends: end it
        chattle.get_bus().publish("stir", "ann", "wake")
        settle(lambda: chattle.rooms.waiters == 0, "the poll answered")
        client.close()
        server.stop(timeout=1)


@pytest.mark.parametrize("kind", ["python", "gunicorn"])
def test_a_client_that_sends_its_next_request_early_and_resets_is_released(tmp_path, kind):
    server = ChattleServer(gunicorn=kind == "gunicorn", log_path=str(tmp_path / ("%s.log" % kind)))
    try:
        baseline, clients = hold(server, 1, "early-reset")
        clients[0].sock.sendall(EARLY_SMALL)
        clients[0].sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        clients[0].close()
        released(server, baseline)
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["python", "gunicorn"])
def test_a_poll_whose_client_left_is_logged_499_with_a_log_on(tmp_path, kind):
    log_path = tmp_path / ("%s.log" % kind)
    env = {"CHATTLE_ACCESS_LOG": "1", "CHATTLE_GUNICORN_ACCESSLOG": "-"}
    server = ChattleServer(gunicorn=kind == "gunicorn", env=env, log_path=str(log_path))
    try:
        baseline, clients = hold(server, 1, "logged")
        clients[0].sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        clients[0].close()
        released(server, baseline)
        wait_until(lambda: " 499 " in log_path.read_text(), 30, "the poll in the access log")
    finally:
        server.stop()
    log = log_path.read_text()
    assert "GET /rooms/logged/msgs?since=0&timeout=60 HTTP/1.1" in log
    assert "Traceback" not in log and "Error" not in log.replace("error", "")


def test_gevent_sockets_still_have_the_idle_read_watcher_watch_peer_borrows():
    """watch_peer starts the socket's own read watcher (gevent's private `_read_event`) with
    the parked greenlet's switch, and stops it: pinned here against a gevent upgrade."""
    ours, theirs = socket.socketpair()
    try:
        woken = []

        def park():
            watcher = chattle_http.watch_peer(ours, gevent.getcurrent().switch)
            woken.append(gevent.get_hub().switch())
            woken.append(chattle_http.peer_gone(ours, watcher))
            watcher.stop()

        parked = gevent.spawn(park)
        gevent.sleep(0)
        assert ours._read_event.callback is not None
        theirs.close()
        parked.join(timeout=10)
        assert woken == [chattle_http.STIRRED, True]
        assert ours._read_event.callback is None and not ours._read_event.active
        assert chattle_http.watch_peer(object(), None) is None  # not a gevent socket: not watched
    finally:
        ours.close()
        theirs.close()
