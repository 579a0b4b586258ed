"""What TLS adds to the load client's work per answer, apart from everything else: the
decryption of one held poll's answer (harness.tls.ClientTls, as the client and the rig
do it) beside the framing of the same plain bytes, and a handshake (both sides).

    python -m loadtests.tls_cost --measure docs/runs/tls-decrypt.json   # measure, keep the JSON
    python -m loadtests.tls_cost docs/runs/tls-decrypt.json             # print docs/results.md's entry

In one process, over memory BIOs (no sockets, no server): the CPU time (process_time)
of each step, the median of several rounds. The answer is a one-message poll answer as
Chattle sends it, encrypted by a TLS 1.3 server with a P-256 certificate made for the run,
as nginx serves it under PROXY=nginx TLS=1.
"""

import argparse
import datetime
import functools
import json
import os
import ssl
import statistics
import sys
import tempfile
import time

from harness.tls import ClientTls, client_context, make_certificates
from instruments.httpframe import ResponseParser
from instruments.page import print_entry, write_json

ROUNDS = 5
ANSWERS_PER_ROUND = 20000
HANDSHAKES_PER_ROUND = 100


def sample_answer():
    """A one-message poll answer, head and body, as Chattle writes it."""
    body = json.dumps({"room": "room-0", "messages": [{"id": 1234, "from": "poster-0", "content": "x" * 64,
                                                       "ts": 1796696582.3342614}],
                       "cursor": 1234, "missed": 0, "epoch": "k3j4h5g6"}, separators=(",", ":")).encode()
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Cache-Control: no-store\r\nDate: Tue, 08 Dec 2026 02:30:00 GMT\r\n\r\n" % len(body))
    return head + body


@functools.lru_cache(maxsize=4)
def server_context(cert, key):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def connected_pair(certificates):
    """(client ClientTls, server SSLObject, server's outgoing BIO), handshake done, in memory."""
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context(certificates.cert, certificates.key).wrap_bio(server_in, server_out, server_side=True)
    client = ClientTls(client_context(certificates.ca), "127.0.0.1")
    done, out = client.handshake()
    for _ in range(10):
        server_in.write(out)
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            pass
        done, out = client.handshake(server_out.read())
        if done and not out:
            break
    server_in.write(out)
    server.do_handshake()
    return client, server, server_out


def measure(certificates, rounds=ROUNDS):
    answer = sample_answer()
    client, server, server_out = connected_pair(certificates)
    client.decrypt(server_out.read())       # the session tickets
    decrypt, frame, handshake = [], [], []
    for _ in range(rounds):
        records = []    # each round its own: a TLS record decrypts once, in its place in the stream
        for _ in range(ANSWERS_PER_ROUND):
            server.write(answer)
            records.append(server_out.read())
        started = time.process_time()
        for record in records:
            client.decrypt(record)
        decrypt.append((time.process_time() - started) / len(records))
        started = time.process_time()
        for _ in range(len(records)):
            ResponseParser().feed(answer)
        frame.append((time.process_time() - started) / len(records))
        started = time.process_time()
        for _ in range(HANDSHAKES_PER_ROUND):
            connected_pair(certificates)
        handshake.append((time.process_time() - started) / HANDSHAKES_PER_ROUND)
    return {"answer_bytes": len(answer), "record_bytes": len(records[0]), "rounds": rounds,
            "answers_per_round": ANSWERS_PER_ROUND, "decrypt_us": statistics.median(decrypt) * 1e6,
            "frame_us": statistics.median(frame) * 1e6, "handshake_us": statistics.median(handshake) * 1e6}


def section(entry):
    started = datetime.datetime.fromtimestamp(entry["started"], datetime.timezone.utc)
    return [
        "`python -m loadtests.tls_cost --measure docs/runs/tls-decrypt.json` — %s UTC, commit %s, %s; shared "
        "machine (others' runs continued). CPU time in one process, the median of %d rounds of %d answers:" % (
            started.strftime("%Y-%m-%d %H:%M"), (entry["commit"] or "?")[:7], entry["machine"], entry["rounds"],
            entry["answers_per_round"]),
        "",
        "| per held poll's answer (%d bytes, %d as a TLS 1.3 record) | client CPU |" % (
            entry["answer_bytes"], entry["record_bytes"]),
        "| --- | ---: |",
        "| decrypting it (`ClientTls.decrypt`) | %.1f us |" % entry["decrypt_us"],
        "| framing the plain bytes (`ResponseParser`, both paths do it) | %.1f us |" % entry["frame_us"],
        "| a whole handshake, client and server sides together (once per connection) | %.0f us |"
        % entry["handshake_us"],
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("entry", help="the kept JSON (docs/runs/tls-decrypt.json)")
    parser.add_argument("--measure", action="store_true", help="measure first and write the JSON")
    args = parser.parse_args(argv)
    if args.measure:
        from instruments.history import git_state
        from instruments.page import machine_line
        with tempfile.TemporaryDirectory(prefix="chattle-tls-cost-") as directory:
            figures = measure(make_certificates(os.path.join(directory, "tls")))
        state = git_state()
        entry = dict(figures, started=time.time(), commit=state["commit"], dirty=state["dirty"],
                     machine=machine_line())
        write_json(args.entry, entry)
    return print_entry(args.entry, section)


if __name__ == "__main__":
    sys.exit(main())
