"""How the rig speaks to the server it measures: Chattle's wire protocol (which the aiohttp
peers speak too), or Nchan's long-poll.

A wire gives the rig four things: a room's position (its cursor), the request a held poll
sends from there, the post that wakes the room (its sequence number and the time its
latency counts from), and the sequence number an answer carries, which the delivery ledger
checks. And it reads how many polls the server holds.

Chattle's position is the room's last id, its post answers with the id and `ts` (when the
server accepted it), and every answer lists the messages after `since`. Nchan's position is
the Last-Modified and Etag of the newest message (sent back as If-Modified-Since and
If-None-Match); a message is the body the poster sent, so the rig's posts carry their own
sequence number and send time, and the latency counts from that send time.
"""

import http.client
import json
import time
import urllib.parse

from chattle_limits import POLL_TIMEOUT_MAX
from harness.nchan import held_subscribers
from harness.processes import get_json, post_json

POLL_TIMEOUT = POLL_TIMEOUT_MAX  # the protocol's longest hold: nothing times out while we measure
EXCHANGE_TIMEOUT = 5.0


class ChattleWire:
    name = "chattle"

    def cursor(self, url, room, ca_file=""):
        """The room's last id (posting one message first, so the room exists). `ca_file`: an
        https:// server's certificate is checked against it."""
        status, body = get_json("%s/rooms/%s/msgs?limit=1" % (url, room), ca_file=ca_file)
        if status == 200 and body["cursor"] > 0:
            return body["cursor"]
        status, body = post_json("%s/rooms/%s/msgs" % (url, room), {"from": "rig", "content": "warm-up"},
                                 ca_file=ca_file)
        if status != 201:
            raise RuntimeError("warm-up post answered %s: %s" % (status, body))
        return body["id"]

    @staticmethod
    def sequence(cursor):
        return cursor

    @staticmethod
    def encode_cursor(cursor):
        """The cursor as one command-line argument of a client process."""
        return str(cursor)

    @staticmethod
    def poll_request(host, port, room, cursor_arg):
        return ("GET /rooms/%s/msgs?since=%d&timeout=%d HTTP/1.1\r\nHost: %s:%d\r\n\r\n"
                % (room, int(cursor_arg), POLL_TIMEOUT, host, port)).encode()

    def post(self, url, room, _cursor, ca_file=""):
        """Post the wake-up: {"id", "ts" (the server's acceptance), "sent" (the rig's send time)}."""
        sent = time.time()
        status, answer = post_json("%s/rooms/%s/msgs" % (url, room), {"from": "rig", "content": "wake"},
                                   ca_file=ca_file)
        if status != 201:
            raise RuntimeError("the post answered %s: %s" % (status, answer))
        return {"id": answer["id"], "ts": answer["ts"], "sent": sent}

    @staticmethod
    def first_id(body):
        """The first message id of an answer, None if it has none or is not one."""
        try:
            messages = json.loads(body)["messages"]
            return messages[0]["id"] if messages else None
        except (TypeError, ValueError, KeyError, IndexError):
            return None

    @staticmethod
    def held(url, ca_file=""):
        """(the answering worker's pid, the polls it holds) from /stats, or None."""
        status, body = get_json(url + "/stats", timeout=EXCHANGE_TIMEOUT, ca_file=ca_file)
        if status == 200 and isinstance(body, dict):
            return body["pid"], body["waiters"]
        return None


class NchanWire:
    """Nchan's long-poll: GET /rooms/<room>/sub, POST /rooms/<room>/pub (harness/nchan.py)."""
    name = "nchan"

    def cursor(self, url, room, ca_file=""):  # plain http:// only: ca_file is Chattle's wire's
        """{"seq", "last_modified", "etag"} of the room's newest message (publishing the first
        one when the channel has none)."""
        if exchange(url, "GET", "/rooms/%s/pub" % room)[0] == 404:  # no such channel yet
            self.publish(url, room, 1, "warm-up")
        status, headers, body = exchange(url, "GET", "/rooms/%s/sub" % room)
        if status != 200:
            raise RuntimeError("the newest message of %s answered %s: %r" % (room, status, body[:200]))
        return {"seq": json.loads(body)["seq"], "last_modified": headers["last-modified"], "etag": headers["etag"]}

    @staticmethod
    def sequence(cursor):
        return cursor["seq"]

    @staticmethod
    def encode_cursor(cursor):
        return json.dumps(cursor, separators=(",", ":"))

    @staticmethod
    def poll_request(host, port, room, cursor_arg):
        cursor = json.loads(cursor_arg)
        return ("GET /rooms/%s/sub HTTP/1.1\r\nHost: %s:%d\r\nIf-Modified-Since: %s\r\nIf-None-Match: %s\r\n\r\n"
                % (room, host, port, cursor["last_modified"], cursor["etag"])).encode()

    def post(self, url, room, cursor, ca_file=""):
        """Publish the message after `cursor`: {"id" (its seq), "ts" and "sent" (both the send time
        the body carries: Nchan stamps nothing)}."""
        seq = self.sequence(cursor) + 1
        sent = self.publish(url, room, seq, "wake")
        return {"id": seq, "ts": sent, "sent": sent}

    @staticmethod
    def publish(url, room, seq, content):
        sent = time.time()
        body = json.dumps({"seq": seq, "sent": sent, "from": "rig", "content": content}).encode()
        status, _headers, answer = exchange(url, "POST", "/rooms/%s/pub" % room, body,
                                            {"Content-Type": "application/json"})
        if status not in (201, 202):
            raise RuntimeError("the publish answered %s: %r" % (status, answer[:200]))
        return sent

    @staticmethod
    def first_id(body):
        try:
            return json.loads(body)["seq"]
        except (TypeError, ValueError, KeyError):
            return None

    @staticmethod
    def held(url, ca_file=""):
        """(None: one figure for the whole server, its subscribers) from nchan_stub_status."""
        status, _headers, body = exchange(url, "GET", "/stats")
        held = held_subscribers(body) if status == 200 else None
        return None if held is None else (None, held)


def exchange(url, method, path, body=None, headers=None):
    """(status, {lower-cased header: value}, body) of one request on its own connection."""
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=EXCHANGE_TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


WIRES = {wire.name: wire for wire in (ChattleWire(), NchanWire())}
CHATTLE = WIRES["chattle"]
NCHAN = WIRES["nchan"]
