"""chattle_request.RequestReader: pywsgi's rfile, read straight off the socket with nothing kept
between requests. Fed through a real socket pair, in pieces smaller and larger than
one recv, as a slow client or a pipelining one sends them."""

import gevent
import pytest
from gevent import socket

import chattle_request


@pytest.fixture
def reader_and_peer():
    ours, theirs = socket.socketpair()
    yield chattle_request.RequestReader(ours), theirs
    ours.close()
    theirs.close()


def send_in_pieces(peer, data, piece):
    def send():
        for start in range(0, len(data), piece):
            peer.sendall(data[start:start + piece])
            gevent.sleep(0.001)
        peer.shutdown(socket.SHUT_WR)
    return gevent.spawn(send)


def test_lines_that_arrive_in_pieces_come_out_whole(reader_and_peer):
    reader, peer = reader_and_peer
    sender = send_in_pieces(peer, b"GET /rooms/a/msgs HTTP/1.1\r\nHost: t\r\n\r\n", 3)
    assert reader.readline(65537) == b"GET /rooms/a/msgs HTTP/1.1\r\n"
    assert reader.readline(65537) == b"Host: t\r\n"
    assert reader.readline(65537) == b"\r\n"
    assert reader.pending == b""
    assert reader.readline(65537) == b""  # end of stream
    sender.get(timeout=10)


def test_a_line_longer_than_one_recv_and_the_callers_cap(reader_and_peer):
    reader, peer = reader_and_peer
    long_line = b"X-Long: " + b"a" * (3 * chattle_request.READ_BUFFER_BYTES) + b"\r\n"
    sender = send_in_pieces(peer, long_line + b"next\r\n", 1000)
    assert reader.readline(65537) == long_line
    assert reader.readline(3) == b"nex"  # capped before the newline, the rest stays
    assert reader.readline(65537) == b"t\r\n"
    sender.get(timeout=10)


def test_pipelined_requests_stay_pending_and_bodies_read_exactly(reader_and_peer):
    reader, peer = reader_and_peer
    peer.sendall(b"POST /msgs HTTP/1.1\r\n\r\n0123456789GET / HTTP/1.1\r\n\r\n")
    peer.shutdown(socket.SHUT_WR)
    assert reader.readline(65537) == b"POST /msgs HTTP/1.1\r\n"
    assert reader.readline(65537) == b"\r\n"
    assert reader.read(10) == b"0123456789"
    assert reader.readline(65537) == b"GET / HTTP/1.1\r\n"
    assert reader.read() == b"\r\n"
    assert reader.read(5) == b""


def test_a_short_body_returns_what_came_before_the_end(reader_and_peer):
    reader, peer = reader_and_peer
    peer.sendall(b"abc")
    peer.shutdown(socket.SHUT_WR)
    assert reader.read(10) == b"abc"
    reader.close()
    assert reader.closed and reader.pending == b""
