"""A small aiohttp chat server speaking the subset of the wire protocol the bench uses.

It is the yardstick of `make bench`: the same rig measures it beside Chattle, so each
report says what one held poll and one woken waiter cost here relative to a plain
asyncio server. To keep the comparison about the servers, it does what Chattle does:
dense ids per room, bounded history, one future swapped per post, and a poll answer
encoded once per (since, limit) and sent as the same bytes to every waiter.

    python -m bench.peers.aiohttp_chat --port 8090
    python -m bench.peers.aiohttp_chat --port 8090 --uvloop   # the same app on uvloop's event loop

On uvloop it is the peer a performance-minded user would choose: the same application,
with libuv's loop and its C transports under aiohttp in place of asyncio's.
"""

import argparse
import asyncio
import collections
import json
import os
import re
import time

from aiohttp import web

ROOM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
HISTORY = 500
MAX_LIMIT = 1000
MAX_TIMEOUT = 60.0
JSON_TYPE = "application/json"


def encode(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class Room:
    def __init__(self, name):
        self.name_json = encode(name)
        self.messages = collections.deque(maxlen=HISTORY)  # (id, encoded message)
        self.last_id = 0
        self.answers = {}
        self.posted = None  # created on first wait: a future needs the running loop

    def add(self, sender, content):
        self.last_id += 1
        message = {"id": self.last_id, "from": sender, "content": content, "ts": time.time()}
        self.messages.append((self.last_id, encode(message)))
        self.answers.clear()
        # A fresh future per post: waiters woken by this one never see it again.
        posted, self.posted = self.posted, None
        if posted is not None and not posted.done():
            posted.set_result(None)
        return message

    def news(self):
        if self.posted is None:
            self.posted = asyncio.get_running_loop().create_future()
        return self.posted

    def answer(self, since, limit):
        key = (since, limit)
        body = self.answers.get(key)
        if body is None:
            body = self.answers[key] = self.encode_answer(since, limit)
        return body

    def encode_answer(self, since, limit):
        reset = since is not None and since > self.last_id
        missed = 0
        if since is None or reset:
            chosen = list(self.messages)[-limit:]
            cursor = self.last_id
        else:
            first_id = self.messages[0][0] if self.messages else self.last_id + 1
            missed = max(0, first_id - 1 - since)
            start = since + 1 + missed - first_id
            chosen = list(self.messages)[start:start + limit]
            cursor = chosen[-1][0] if chosen else since
        parts = [b'{"room":', self.name_json, b',"messages":[', b",".join(f for _i, f in chosen),
                 b'],"cursor":%d,"missed":%d' % (cursor, missed)]
        if reset:
            parts.append(b',"reset":true')
        parts.append(b"}")
        return b"".join(parts)


class Chat:
    def __init__(self):
        self.rooms = {}
        self.waiters = 0

    def room(self, name):
        if not ROOM_NAME.match(name):
            raise _error(404, "room names are 1 to 64 of A-Z a-z 0-9 _ -")
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name)
        return room


def _error(status, message):
    error = web.HTTPException(text=json.dumps({"error": message}), content_type=JSON_TYPE)
    error.set_status(status)
    return error


def number(request, name, kind, low, high, default):
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise _error(400, "%s must be a number from %s to %s" % (name, low, high))
    if not low <= value <= high:
        raise _error(400, "%s must be a number from %s to %s" % (name, low, high))
    return value


def json_bytes(body, status=200):
    return web.Response(body=body, status=status, content_type=JSON_TYPE, charset="utf-8")


async def poll(request):
    chat = request.app["chat"]
    room = chat.room(request.match_info["room"])
    since = number(request, "since", int, 0, 2 ** 63, None)
    limit = number(request, "limit", int, 1, MAX_LIMIT, 50 if since is None else 100)
    timeout = number(request, "timeout", float, 0, MAX_TIMEOUT, 25.0)
    if since is not None and since == room.last_id and timeout > 0:
        chat.waiters += 1
        try:
            # shield: a timed-out poll must not cancel the future its room shares
            async with asyncio.timeout(timeout):
                await asyncio.shield(room.news())
        except TimeoutError:
            pass
        finally:
            chat.waiters -= 1
    return json_bytes(room.answer(since, limit))


async def post(request):
    room = request.app["chat"].room(request.match_info["room"])
    if request.content_type != JSON_TYPE:
        raise _error(415, "send the message as application/json")
    try:
        payload = json.loads(await request.read())
    except ValueError:
        raise _error(400, "the body is not JSON")
    sender = payload.get("from") if isinstance(payload, dict) else None
    content = payload.get("content") if isinstance(payload, dict) else None
    if not (isinstance(sender, str) and 1 <= len(sender.strip()) <= 40
            and isinstance(content, str) and 1 <= len(content) <= 2000):
        raise _error(400, "send {\"from\": 1-40 characters, \"content\": 1-2000 characters}")
    message = room.add(sender.strip(), content)
    return json_bytes(encode({"room": request.match_info["room"], "id": message["id"], "ts": message["ts"]}), 201)


async def health(_request):
    return json_bytes(encode({"status": "ok", "bus": "memory", "pid": os.getpid()}))


def rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def stats(request):
    chat = request.app["chat"]
    return json_bytes(encode({
        "pid": os.getpid(), "bus": "memory", "waiters": chat.waiters, "rooms": len(chat.rooms),
        "messages": sum(len(r.messages) for r in chat.rooms.values()), "rss_bytes": rss_bytes(),
        "server": "aiohttp reference", "loop": type(asyncio.get_running_loop()).__module__,
    }))


def make_app():
    app = web.Application(client_max_size=16 * 1024)
    app["chat"] = Chat()
    app.router.add_get("/rooms/{room}/msgs", poll)
    app.router.add_post("/rooms/{room}/msgs", post)
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description="aiohttp reference chat server for the bench")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8090, help="port (default %(default)s)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop, not asyncio's")
    args = parser.parse_args(argv)
    loop = None
    if args.uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
    # backlog as deep as Chattle's, so parking 10k polls is not throttled by accept();
    # a short shutdown, so polls still held at SIGTERM do not delay a stop by a minute
    web.run_app(make_app(), host=args.host, port=args.port, backlog=4096, access_log=None, print=None,
                shutdown_timeout=1.0, loop=loop)


if __name__ == "__main__":
    main()
