#!/usr/bin/env python3
"""Chattle: a Bottle + gevent long-poll chat server.

Every waiting client is a greenlet parked on a gevent Event of its room; a post sets
them, waking every held poll at once (the "Event-based broadcast path"), and later polls
park on fresh ones. The contract with every client is the wire protocol described in
docs/protocol.md (version 1).

This module is the app: its settings, its routes and their input checks, and serving. The
rooms are in chattle_rooms.py, the buses in chattle_bus.py (the interface, the in-memory
bus), chattle_redis.py and chattle_cluster.py, the HTTP layer in chattle_http.py and
chattle_request.py (docs/design.md maps them).

    python chattle.py [--port 8080]                                  # one process
    gunicorn chattle                        # gunicorn.conf.py: chattle's gevent worker
    gunicorn --bind 0.0.0.0:8080 --worker-class gevent --workers 1 chattle   # also works
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (everything below must see the patched stdlib)
import ipaddress  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

# Each spawned greenlet would record its spawner and the spawning stack, for debugging
# tools; every held poll is a greenlet, so that record was kept once per waiter.
gevent.config.track_greenlet_tree = False
import bottle  # noqa: E402
from bottle import Bottle, HTTPResponse, request, response, static_file, template  # noqa: E402
from greenlet import getcurrent  # noqa: E402

import chattle_http  # noqa: E402
import chattle_metrics  # noqa: E402
from chattle_bus import BusUnavailable, MemoryBus  # noqa: E402
from chattle_cluster import RedisClusterBus  # noqa: E402
from chattle_limits import (  # noqa: E402
    BODY_READ_TIMEOUT,
    MAX_BODY_BYTES,
    POLL_TIMEOUT_MAX,
    collect_garbage_seldom,
    raise_descriptor_limit,
)
from chattle_redis import RedisBus, redis_url_problem  # noqa: E402
from chattle_rooms import CLIENT_LEFT, Room, Rooms, RoomsFull, Wakeup, encode  # noqa: E402,F401  (Room, Wakeup: for tests and tools)

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC_ROOT = os.path.join(HERE, "static")
VIEWS_ROOT = os.path.join(HERE, "views")

PROTOCOL_VERSION = 1

###############################################################################
# Settings: argparse flags for `python chattle.py`, CHATTLE_* variables for gunicorn
###############################################################################

ROOM_PATTERN = r"[A-Za-z0-9_-]{1,64}"
MAX_FROM_CHARS = 40
MAX_CONTENT_CHARS = 2000
MAX_POLL_TIMEOUT = POLL_TIMEOUT_MAX  # what every client's timeout nests around: chattle_limits.py
MAX_LIMIT = 1000
DEFAULT_LIMIT_SINCE = 100
DEFAULT_LIMIT_RECENT = 50

# (flag, environment variable, type, default, help)
SETTINGS = [
    ("host", "CHATTLE_HOST", str, "127.0.0.1", "address to listen on"),
    ("port", "CHATTLE_PORT", int, 8080, "TCP port to listen on"),
    ("history", "CHATTLE_HISTORY", int, 500, "messages retained per room; older ones count as 'missed'"),
    ("poll_timeout", "CHATTLE_POLL_TIMEOUT", float, 25.0,
     "seconds a poll is held when the client gives no 'timeout' (0 to 60)"),
    ("redis", "CHATTLE_REDIS_URL", str, "",
     "share one history between workers and hosts through Redis, e.g. redis://127.0.0.1:6379/0; "
     "empty keeps the in-memory bus"),
    ("redis_cluster", "CHATTLE_REDIS_CLUSTER", str, "",
     "share one history through a Redis Cluster instead, given by one or more of its nodes, "
     "host:port[,host:port]; each room lives on one master (docs/cluster.md)"),
    ("redis_wait", "CHATTLE_REDIS_WAIT", int, 1000,
     "with --redis-cluster: milliseconds a post waits for a replica to have it (WAIT 1 <ms>) before "
     "its 201, so that it survives a failover; not confirmed in time: 503; 0 answers at once, and a "
     "failover may then lose acknowledged posts and give their ids again (docs/cluster.md)"),
    ("idempotency_seconds", "CHATTLE_IDEMPOTENCY_SECONDS", int, 300,
     "seconds a post's Idempotency-Key is remembered: the same key to the same room within them "
     "is answered as the first post was, and not posted again"),
    ("idempotency_keys", "CHATTLE_IDEMPOTENCY_KEYS", int, 10000,
     "Idempotency-Keys the in-memory bus remembers per worker; beyond, the oldest are forgotten "
     "(the shared bus keeps each in Redis for --idempotency-seconds)"),
    ("stop_timeout", "CHATTLE_STOP_TIMEOUT", float, 5.0,
     "seconds a stopping `python chattle.py` lets requests inside the shared bus (a post Redis has "
     "not answered yet) finish before it closes the bus; gunicorn waits its graceful_timeout instead"),
    ("access_log", "CHATTLE_ACCESS_LOG", int, 0,
     "1 logs every request (costly with thousands of held polls)"),
    ("max_retained_bytes", "CHATTLE_MAX_RETAINED_BYTES", int, 256 * 1024 * 1024,
     "bytes of messages a worker retains over all its rooms; beyond, the least recently "
     "active rooms are forgotten (their clients are told 'reset' or 'missed')"),
    ("room_cache_bytes", "CHATTLE_ROOM_CACHE_BYTES", int, 1024 * 1024,
     "bytes of encoded poll answers a room keeps for its fan-outs to share"),
    ("answer_cache_bytes", "CHATTLE_ANSWER_CACHE_BYTES", int, 64 * 1024 * 1024,
     "bytes of encoded poll answers a worker keeps over all its rooms"),
    ("room_ttl", "CHATTLE_ROOM_TTL", int, 7 * 24 * 3600,
     "seconds the shared bus keeps a room nobody posts to (every post starts it again)"),
    ("max_polls_per_address", "CHATTLE_MAX_POLLS_PER_ADDRESS", int, 1024 * 1024,
     "polls a worker holds at once for one client address (REMOTE_ADDR: behind a proxy, the "
     "proxy's unless --trusted-proxy names it); more: 429. The default is above any worker's open-file limit"),
    ("trusted_proxy", "CHATTLE_TRUSTED_PROXY", str, "",
     "addresses of reverse proxies, separated by commas, whose X-Forwarded-For names the client: a request "
     "from one of them counts against --max-polls-per-address as the last address of that header; from any "
     "other peer the header is ignored. Empty: no proxy is trusted"),
    ("max_answer_bytes", "CHATTLE_MAX_ANSWER_BYTES", int, 256 * 1024,
     "bytes of messages one poll answer carries (always at least one message): a poll past it "
     "gets fewer than its 'limit', and the rest on its next poll"),
    ("max_rooms", "CHATTLE_MAX_ROOMS", int, 100000,
     "rooms a worker holds; beyond, the least recently active idle rooms are forgotten, and a new "
     "room is refused (503) only while every room is in use"),
    ("max_bus_rooms", "CHATTLE_MAX_BUS_ROOMS", int, 1000000,
     "rooms the shared Redis holds (each posted to within --room-ttl); a post that would make one "
     "more is refused (503); on a Redis Cluster the bound is per slot, this over 16384"),
] + chattle_http.LIMIT_SETTINGS


def trusted_proxies(listed):
    """The addresses of --trusted-proxy, as REMOTE_ADDR spells them; SystemExit names one
    that is not an address."""
    addresses = set()
    for item in filter(None, (part.strip() for part in listed.split(","))):
        try:
            addresses.add(str(ipaddress.ip_address(item)))
        except ValueError:
            raise SystemExit("chattle: --trusted-proxy %r is not an IP address (give the proxy's own address, "
                             "e.g. 127.0.0.1)" % item) from None
    return frozenset(addresses)


def forwarded_address(environ, proxy):
    """The client a trusted proxy at `proxy` names: the last address of its X-Forwarded-For
    (the peer that proxy saw; what a client wrote there before it comes first and is not
    believed). A header that names no address counts against the proxy itself."""
    forwarded = environ.get("HTTP_X_FORWARDED_FOR", "").rpartition(",")[2].strip()
    try:
        return str(ipaddress.ip_address(forwarded))
    except ValueError:
        return proxy


class Settings:
    def __init__(self, **values):
        for name, _env, kind, default, _help in SETTINGS:
            setattr(self, name, kind(values.get(name, default)))
        if not 1 <= self.history:
            raise SystemExit("chattle: --history must be at least 1")
        if not 0 <= self.poll_timeout <= MAX_POLL_TIMEOUT:
            raise SystemExit("chattle: --poll-timeout must be between 0 and %g seconds" % MAX_POLL_TIMEOUT)
        for name in ("max_retained_bytes", "room_cache_bytes", "answer_cache_bytes", "room_ttl",
                     "max_polls_per_address", "max_answer_bytes", "max_rooms", "max_bus_rooms"):
            if getattr(self, name) < 1:
                raise SystemExit("chattle: --%s must be at least 1" % name.replace("_", "-"))
        if self.redis and self.redis_cluster:
            raise SystemExit("chattle: give either --redis or --redis-cluster, not both")
        if self.redis and redis_url_problem(self.redis):
            raise SystemExit("chattle: --redis %r is not a Redis URL (%s); for example redis://127.0.0.1:6379/0"
                             % (self.redis, redis_url_problem(self.redis)))
        if self.redis_wait < 0:
            raise SystemExit("chattle: --redis-wait must be 0 (answer at once) or more milliseconds")
        if self.idempotency_seconds < 1 or self.idempotency_keys < 1:
            raise SystemExit("chattle: --idempotency-seconds and --idempotency-keys must be at least 1")
        if not 0 <= self.stop_timeout <= 3600:
            raise SystemExit("chattle: --stop-timeout must be 0 (close the bus at once) to 3600 seconds")
        self.trusted_proxies = trusted_proxies(self.trusted_proxy)
        self.http_limits()  # checks them

    def http_limits(self):
        return chattle_http.HttpLimits(**{name: getattr(self, name) for name, *_rest in chattle_http.LIMIT_SETTINGS})

    @classmethod
    def from_environ(cls, environ=os.environ):
        return cls(**chattle_http.values_from_environ(SETTINGS, environ))


def parse_args(argv=None):
    defaults = Settings.from_environ()
    parser = argparse.ArgumentParser(
        description="Chattle long-poll chat server (gevent pywsgi). "
        "Every flag can also be set with the CHATTLE_* variable named in its help.")
    for name, env, kind, _default, help_text in SETTINGS:
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name),
                            help="%s (env %s, default %%(default)s)" % (help_text, env))
    return Settings(**vars(parser.parse_args(argv)))


###############################################################################
# JSON answers and errors
###############################################################################

JSON_TYPE = "application/json; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"


# What /stats and /metrics call an application's refusal, by its status, unless the raiser names it.
REFUSAL_REASONS = {400: "bad_request", 413: "body_too_large", 415: "unsupported_media_type",
                   429: "too_many_polls_per_address", 503: "bus_unavailable"}


def json_error(status, message, reason=None, **headers):
    """An HTTPResponse to raise: every error the protocol names is a JSON object."""
    chattle_http.count_refusal(reason or REFUSAL_REASONS[status])
    headers["Content-Type"] = JSON_TYPE
    return HTTPResponse(encode({"error": message}), status, headers)


###############################################################################
# Buses: how a post reaches every worker's rooms (chattle_bus.py names what one does)
###############################################################################

def make_bus(settings, rooms):
    if settings.redis_cluster:
        return RedisClusterBus(rooms, settings.redis_cluster, settings.history, settings.room_ttl,
                               settings.redis_wait, settings.idempotency_seconds, settings.max_bus_rooms)
    if settings.redis:
        return RedisBus(rooms, settings.redis, settings.history, settings.room_ttl, settings.idempotency_seconds,
                        settings.max_bus_rooms)
    return MemoryBus(rooms, settings.idempotency_seconds, settings.idempotency_keys)


###############################################################################
# Input checks
###############################################################################

_CONTROL_IN_NAME = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_IN_CONTENT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# JSON may escape half a surrogate pair ("\ud800"): no UTF-8 can carry it back out.
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
# Plain decimals only: Python's int() and float() also take "1_0", " 7 ", "1e3", "inf".
_PLAIN_NUMBER = {int: re.compile(r"-?[0-9]{1,30}"), float: re.compile(r"-?[0-9]{1,30}(\.[0-9]{1,30})?")}
_EPOCH = re.compile(r"[0-9A-Za-z]{1,32}")


def query_number(query, name, kind, low, high, default):
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw) if _PLAIN_NUMBER[kind].fullmatch(raw) else None
    except ValueError:
        value = None
    if value is None or value != value or not low <= value <= high:  # value != value: NaN
        raise json_error(400, "query parameter %r must be %s from %s to %s, got %r"
                         % (name, "an integer" if kind is int else "a number", low, high, raw[:40]))
    return value


def poll_arguments():
    """since, limit, timeout and epoch of a poll, from its query string.

    Parsed by Bottle's own query parser (the last value of a repeated name wins, as
    with request.query.get), but not through request.query: that FormsDict stays in
    the request's environ, and so in memory for as long as the poll is held."""
    query = dict(bottle._parse_qsl(request.environ.get("QUERY_STRING", "")))
    since = query_number(query, "since", int, 0, sys.maxsize, None)
    limit = query_number(query, "limit", int, 1, MAX_LIMIT,
                         DEFAULT_LIMIT_RECENT if since is None else DEFAULT_LIMIT_SINCE)
    timeout = query_number(query, "timeout", float, 0, MAX_POLL_TIMEOUT, settings.poll_timeout)
    epoch = query.get("epoch") or None
    if epoch is not None and not _EPOCH.fullmatch(epoch):
        raise json_error(400, "query parameter 'epoch' must be the 'epoch' of an answer (1 to 32 letters "
                         "and digits), got %r" % epoch[:40])
    return since, limit, timeout, epoch


def read_json_object():
    media_type = request.environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise json_error(415, "send the message as JSON with 'Content-Type: application/json'")
    raw_length = request.environ.get("CONTENT_LENGTH") or ""
    if raw_length:
        if not raw_length.isdigit():
            raise json_error(400, "Content-Length %r is not a byte count" % raw_length[:40])
        if int(raw_length) > MAX_BODY_BYTES:
            raise json_error(413, "body of %s bytes is over the %d byte limit" % (raw_length, MAX_BODY_BYTES),
                             Connection="close")
        to_read = int(raw_length)
    else:
        to_read = MAX_BODY_BYTES + 1  # chunked: read one byte past the limit to see it
    try:
        with gevent.Timeout(BODY_READ_TIMEOUT):
            body = request.environ["wsgi.input"].read(to_read)
    except gevent.Timeout:
        raise json_error(400, "the body did not arrive within %g seconds" % BODY_READ_TIMEOUT,
                         Connection="close")
    except (OSError, ValueError) as exc:
        raise json_error(400, "the body could not be read: %s" % exc, Connection="close")
    if len(body) > MAX_BODY_BYTES:
        raise json_error(413, "body is over the %d byte limit" % MAX_BODY_BYTES, Connection="close")
    if raw_length and len(body) < to_read:
        raise json_error(400, "the body ended after %d of %d bytes" % (len(body), to_read), Connection="close")
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise json_error(400, 'body is not JSON; send {"from": "<name>", "content": "<text>"}')
    except RecursionError:  # 16 KiB of "[" nests deeper than the parser recurses
        raise json_error(400, 'body nests too deep; send {"from": "<name>", "content": "<text>"}')
    if not isinstance(payload, dict):
        raise json_error(400, 'body must be a JSON object: {"from": "<name>", "content": "<text>"}')
    return payload


def checked_message(payload):
    sender, content = payload.get("from"), payload.get("content")
    if not isinstance(sender, str):
        raise json_error(400, "'from' is required and must be a string of 1 to %d characters" % MAX_FROM_CHARS)
    if not isinstance(content, str):
        raise json_error(400, "'content' is required and must be a string of 1 to %d characters"
                         % MAX_CONTENT_CHARS)
    sender = sender.strip()
    if not 1 <= len(sender) <= MAX_FROM_CHARS:
        raise json_error(400, "'from' must be 1 to %d characters after trimming, got %d"
                         % (MAX_FROM_CHARS, len(sender)))
    if not 1 <= len(content) <= MAX_CONTENT_CHARS:
        raise json_error(400, "'content' must be 1 to %d characters, got %d" % (MAX_CONTENT_CHARS, len(content)))
    if _CONTROL_IN_NAME.search(sender):
        raise json_error(400, "'from' may not contain control characters")
    if _CONTROL_IN_CONTENT.search(content):
        raise json_error(400, "'content' may not contain control characters other than newline and tab")
    for field, text in (("from", sender), ("content", content)):
        half_pair = _LONE_SURROGATE.search(text)
        if half_pair:
            raise json_error(400, "'%s' holds half of a UTF-16 surrogate pair (\\u%04x); send valid Unicode"
                             % (field, ord(half_pair.group())))
    return sender, content


###############################################################################
# The application
###############################################################################

def greenlet_local_property(name):
    """Bottle keeps `request` and `response` in six thread-locals; gevent makes each one a
    gevent.local whose first use in every new greenlet builds its own dict and weak
    reference, which was the largest single cost of answering a woken poll. The greenlet's
    own __dict__ holds the same per-greenlet state, and goes with the greenlet."""
    key = "chattle.bottle." + name

    def fget(_self):
        try:
            return getcurrent().__dict__[key]
        except KeyError:
            raise RuntimeError("Request context not initialized.")

    def fset(_self, value):
        getcurrent().__dict__[key] = value

    def fdel(_self):
        del getcurrent().__dict__[key]

    return property(fget, fset, fdel)


# Every per-request attribute Bottle keeps in a thread-local, by class.
BOTTLE_LOCAL_STATE = ((bottle.LocalRequest, ("environ",)),
                      (bottle.LocalResponse, ("_status_line", "_status_code", "_cookies", "_headers", "body")))
for _cls, _names in BOTTLE_LOCAL_STATE:
    for _name in _names:
        setattr(_cls, _name, greenlet_local_property("%s.%s" % (_cls.__name__, _name)))

app = Bottle()
# Every route returns bytes or raises HTTPResponse itself: the JSON and template plugins
# would only wrap each answer in one more call (a cost paid per woken poll).
app.uninstall(True)
# The name gunicorn and other WSGI servers look for: the bound method, as make_server
# serves, since calling the Bottle instance adds a level of C stack to every request.
application = app.wsgi
# Nearly every answer is JSON; the page sets its own type.
bottle.LocalResponse.default_content_type = JSON_TYPE

settings = Settings.from_environ()
rooms = Rooms.from_settings(settings)
bus = None  # made on first use, in the process that serves (after gunicorn forks)
bus_calls = 0  # requests inside the bus now: a stopping `python chattle.py` waits for them (serve)
posts_accepted = 0  # posts this process wrote (not those an Idempotency-Key answered again)


def configure(new_settings):
    """Apply settings before serving; replaces the rooms and the bus."""
    global settings, rooms, bus
    if bus is not None:
        bus.close()
    settings = new_settings
    rooms = Rooms.from_settings(settings)
    bus = None


def get_bus():
    global bus
    if bus is None:
        made = make_bus(settings, rooms)
        # Making a bus may wait on the network (the cluster bus asks its nodes), and a
        # request that came meanwhile made one too: one is kept, the other closed, so no
        # second reader follows every post for nobody.
        if bus is None:
            bus = made
        else:
            made.close()
    return bus


def json_answer(body, status=200):
    # 200 and JSON are what every answer starts as (LocalResponse.default_content_type): setting
    # them again cost each woken poll about 7 us of bottle's header handling.
    if status != 200:
        response.status = status
    if rooms.closing:
        response.set_header("Connection", "close")
    return body


ROOM_URL = "/rooms/<room:re:%s>" % ROOM_PATTERN


@app.get("/")
@app.get(ROOM_URL)
def chat_page(room="lobby"):
    response.content_type = HTML_TYPE
    return template("index", room=room, template_lookup=[VIEWS_ROOT])


@app.get("/static/<path:path>")
def static(path):
    return static_file(path, root=STATIC_ROOT)


@app.get("/msgs")
@app.get(ROOM_URL + "/msgs")
def poll_messages(room="lobby"):
    since, limit, timeout, epoch = poll_arguments()
    global bus_calls
    bus_calls += 1
    try:
        chat = get_bus().room(room, since, epoch)
    except BusUnavailable as exc:
        raise json_error(503, "the shared bus is unreachable (%s); retry later" % exc, **{"Retry-After": "1"})
    except RoomsFull as exc:
        raise json_error(503, str(exc), "rooms_full", **{"Retry-After": "%d" % exc.retry_after})
    finally:
        bus_calls -= 1
    environ = request.environ
    sends_json = environ.get(chattle_http.SENDS_JSON)
    # Both outlive forget_request: the connection holds the same objects.
    address = environ.get("REMOTE_ADDR")
    if address in settings.trusted_proxies:   # a poll through one counts against the client it names
        address = forwarded_address(environ, address)
    peer = environ.get(chattle_http.PEER) or environ.get("gunicorn.socket")
    held = since is not None and chat.holds(since, timeout, epoch)
    if held and not chat.registry.hold_poll(address):
        if chat.registry.release(chat):  # a room only this refused poll named would stay for good
            bus.forget(room)
        raise json_error(429, "too many polls held for the client address %s: at most %d "
                         "(--max-polls-per-address, CHATTLE_MAX_POLLS_PER_ADDRESS); poll again once one ends"
                         % (address, chat.registry.max_polls_per_address),
                         **{"Retry-After": "1", "Connection": "close"})
    if sends_json == chattle_http.FORGET and since is not None:
        forget_request()
    if epoch is None:
        # A client that names no history is taken to be in the one it arrived in: a poll
        # held across a start of the history is still told "reset".
        epoch = chat.epoch
    held_for = address if held else None  # the address it is counted against while held
    if held and sends_json:
        # chattle_http's handler holds it, past Bottle's frames
        raise chattle_http.Hold(HeldPoll(chat, since, limit, timeout, epoch, peer, held_for))
    body = answer_poll(chat, since, limit, timeout, epoch, peer, held_for, sends_json)
    if sends_json:
        # Straight to chattle_http's handler: every waiter of a fan-out sends the same head.
        raise chattle_http.SendJson(body, close=rooms.closing)
    return json_answer(body)


class HeldPoll:
    """A poll chattle_http's handler holds (chattle_http.Hold): what its answer needs, and
    nothing of its request."""

    __slots__ = ("chat", "since", "limit", "timeout", "epoch", "peer", "held_for")

    def __init__(self, chat, since, limit, timeout, epoch, peer, held_for):
        self.chat, self.since, self.limit, self.timeout, self.epoch = chat, since, limit, timeout, epoch
        self.peer, self.held_for = peer, held_for

    def answer(self):
        return answer_poll(self.chat, self.since, self.limit, self.timeout, self.epoch, self.peer, self.held_for,
                           True), rooms.closing


def answer_poll(chat, since, limit, timeout, epoch, peer, held_for, sends_json):
    """The body of a poll's answer, once there is news when it is held. `held_for`: the
    client address the poll is counted against while held (None: not counted). When its
    client left meanwhile: PeerGone where chattle_http's handler takes it (`sends_json`),
    else the answer at a timeout."""
    try:
        shared = since is not None and chat.wait_for_news(since, timeout, epoch, peer)
    finally:
        if held_for is not None:
            chat.registry.end_poll(held_for)
    if shared is CLIENT_LEFT:
        if sends_json:  # chattle_http's handler closes the connection unanswered
            if rooms.release(chat):
                bus.forget(chat.name)
            raise chattle_http.PeerGone
        # Another server (gunicorn's own worker): answered as at a timeout, and the
        # server finds the connection gone as it writes.
        shared = False
    body = chat.answer(since, limit, shared, epoch)
    if rooms.release(chat):
        bus.forget(chat.name)
    return body


# The per-request state Bottle's response keeps in the greenlet (see greenlet_local_property).
BOTTLE_RESPONSE_STATE = tuple("chattle.bottle.LocalResponse." + name for name in BOTTLE_LOCAL_STATE[1][1])


def forget_request():
    """A poll that may be held keeps nothing of its request and response: the environ
    (its dict, headers, addresses, path, query and Bottle's route keys) is emptied, and
    Bottle's response state (a header dict among it) dropped, about 1.5 KB per held poll.
    Only where chattle_http says nothing reads them afterwards: the poll's answer leaves as
    SendJson, which neither Bottle nor the handler looks at them for. The greenlet's dict,
    which that state grew, is made again at the size of what is left (88 bytes less: a
    dict keeps its size as keys go, and so does its copy())."""
    request.environ.clear()
    current = getcurrent()
    state = current.__dict__
    for key in BOTTLE_RESPONSE_STATE:
        state.pop(key, None)
    current.__dict__ = dict(state.items())


@app.post("/msgs")
@app.post(ROOM_URL + "/msgs")
def post_message(room="lobby"):
    sender, content = checked_message(read_json_object())
    key = idempotency_key()
    global bus_calls
    bus_calls += 1
    try:
        message = get_bus().publish(room, sender, content, key)
    except BusUnavailable as exc:
        chattle_http.count_refusal("bus_unavailable")
        if exc.maybe_written:
            error = ("the shared bus did not confirm the post (%s): its outcome is unknown, it may have been "
                     "posted; retry with the same Idempotency-Key, which posts it at most once" % exc)
        else:
            error = "the shared bus is unreachable (%s); nothing was written, retry later" % exc
        raise HTTPResponse(encode({"error": error, "outcome": "unknown" if exc.maybe_written else "not written"}),
                           503, {"Content-Type": JSON_TYPE, "Retry-After": "1"})
    except RoomsFull as exc:
        chattle_http.count_refusal("rooms_full")
        raise HTTPResponse(encode({"error": str(exc), "outcome": "not written"}), 503,
                           {"Content-Type": JSON_TYPE, "Retry-After": "%d" % exc.retry_after})
    finally:
        bus_calls -= 1
    if "replayed" not in message:
        global posts_accepted
        posts_accepted += 1
    return json_answer(encode({"room": room, "id": message["id"], "ts": message["ts"], "epoch": message["epoch"]}),
                       201)


_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,64}")


def idempotency_key():
    """The post's Idempotency-Key header (None without one): 1 to 64 visible ASCII characters."""
    key = request.environ.get("HTTP_IDEMPOTENCY_KEY")
    if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise json_error(400, "the Idempotency-Key header must be 1 to 64 visible ASCII characters "
                              "(no spaces), got %d characters" % len(key))
    return key


@app.get("/health")
def health():
    current = get_bus()
    ok, reason = current.health()
    # "time": the clock `ts` comes from, so a client on another host can measure its offset to it
    body = {"status": "ok" if ok else "degraded", "bus": current.name, "pid": os.getpid(),
            "time": current.clock() if ok else None}
    if current.reader_state() is not None:  # a shared bus: how its reader is doing
        body["bus_reader"] = current.reader_state()
    if not ok:
        body["reason"] = reason
    return json_answer(encode(body), 200 if ok else 503)


@app.get("/stats")
def stats():
    return json_answer(encode(worker_figures()))


def worker_figures():
    """What /stats answers and /metrics reads of this worker (chattle_metrics.py), taken now."""
    return {
        "pid": os.getpid(),
        "bus": get_bus().name,
        "waiters": rooms.waiters,
        "rooms": len(rooms.by_name),
        "messages": rooms.retained(),
        "rss_bytes": rss_bytes(),
        "encodes": rooms.encodes,
        "rooms_forgotten": rooms.forgotten,
        "retained_bytes": rooms.retained_bytes,
        "answer_cache_bytes": rooms.cached_bytes,
        # what the bus's readers were given: every post of the cluster, or only the held rooms'
        "bus_posts_received": get_bus().posts_received,
        "bus_posts_received_for_rooms_not_held": get_bus().posts_received_for_rooms_not_held,
        "bus_reader": get_bus().reader_state(),
        # read together, so that descriptors beyond the open connections is exact
        "connections": chattle_http.open_connections(),
        # answers held for clients still taking them (bounded: max_unsent_bytes), and the
        # connections dropped to keep them so
        "unsent_bytes": chattle_http.unsent_bytes(),
        "unsent_dropped": chattle_http.unsent_dropped(),
        "descriptors": descriptors_open(),
        "protocol": PROTOCOL_VERSION,
        # polls a post woke (the polls held on its room), posts written here, and refusals by reason
        "deliveries": rooms.deliveries,
        "posts": posts_accepted,
        "refusals": chattle_http.refusals(),
        # seconds from a post reaching a room with held polls until every one was answered
        "fan_out_seconds": rooms.fan_out_times.figures(),
        "bus_reader_lag_seconds": get_bus().reader_lag(),
    }


@app.get("/metrics")
def metrics():
    """/stats in the Prometheus text format, summed over every worker of a gunicorn master."""
    if request.environ.get("QUERY_STRING"):
        raise json_error(400, "/metrics takes no query parameters; got %r"
                         % request.environ["QUERY_STRING"][:40])
    response.content_type = chattle_metrics.CONTENT_TYPE
    # a stopping worker closes the scraper's keep-alive connection, or its graceful stop waits for it
    return json_answer(chattle_metrics.exposition(worker_figures))


def descriptors_open():
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
    except OSError:
        return None


def rss_bytes():
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def error_page(error):
    """Every error Bottle raises itself (404, 405, a crash) answers as JSON too."""
    response.content_type = JSON_TYPE
    chattle_http.count_refusal({404: "no_such_route", 405: "method_not_allowed"}.get(
        error.status_code, "server_error" if error.status_code >= 500 else "http_%d" % error.status_code))
    if error.status_code == 404:
        message = ("no such route: %s %s; rooms are named by %s"
                   % (request.method, request.path[:200], ROOM_PATTERN))
    elif error.status_code == 405:
        message = "%s is not allowed here; use %s" % (request.method, response.get_header("Allow", "GET"))
    elif error.status_code >= 500:
        message = "the server failed on this request; it was not applied, please retry"
    else:
        message = str(error.body)[:200]
    return encode({"error": message})


app.default_error_handler = error_page


###############################################################################
# Serving with `python chattle.py`
###############################################################################



def pywsgi_handler_class(base=None):
    """chattle_http's handler (on `base`, pywsgi's or a subclass such as gunicorn's) under
    this process's settings."""
    return chattle_http.handler_class(settings.http_limits(), base, access_log=settings.access_log)


def pywsgi_server_class(base=None):
    """chattle_http's server (on `base`, pywsgi's or a subclass such as gunicorn's) under
    this process's settings."""
    return chattle_http.server_class(settings.http_limits(), base, access_log=settings.access_log)


def make_server(host, port):
    """The gevent pywsgi server `python chattle.py` runs (bench/anatomy.py measures it too).

    It is given `app.wsgi`, the Bottle application's own entry point, rather than `app`:
    calling an instance goes through its type's __call__ slot, one more level of C stack
    on every request."""
    return pywsgi_server_class()((host, port), app.wsgi, backlog=4096,
                                 log=sys.stderr if settings.access_log else None)


# Once in each serving process, after the application is loaded: the policy the load
# workers share, stated in chattle_limits.py.
tune_garbage_collector = collect_garbage_seldom

def say_if_degraded(current):
    """One line on stderr when the bus starts without its Redis: the process serves anyway
    (503 for what needs Redis) and recovers by itself once Redis answers."""
    ok, reason = current.health()
    if not ok:
        sys.stderr.write("chattle: the shared bus is unreachable (%s); posts and polls that need it answer "
                         "503 until it is back, /health says degraded\n" % reason)
        sys.stderr.flush()


def finish_bus_calls(timeout):
    """Wait, at most `timeout`, for the requests inside the bus: closed under them, a post Redis
    wrote would be answered 503 "nothing was written", or not at all."""
    deadline = time.monotonic() + timeout
    while bus_calls and time.monotonic() < deadline:
        gevent.sleep(0.01)


def serve(new_settings):
    configure(new_settings)
    raise_descriptor_limit()
    tune_garbage_collector()
    server = make_server(settings.host, settings.port)

    def stop(*_signal):
        rooms.close()
        gevent.spawn(server.stop, timeout=settings.stop_timeout)

    gevent.signal_handler(signal.SIGTERM, stop)
    gevent.signal_handler(signal.SIGINT, stop)
    try:
        server.start()
    except OSError as exc:
        raise SystemExit("chattle: cannot listen on %s:%s (%s); pick another --port"
                         % (settings.host, settings.port, exc.strerror or exc))
    get_bus()
    print("chattle: serving on http://%s:%d/ (bus: %s, pid %d)"
          % (settings.host, server.server_port, bus.name, os.getpid()), flush=True)
    say_if_degraded(bus)
    server.serve_forever()
    finish_bus_calls(settings.stop_timeout)
    if bus is not None:
        bus.close()


if __name__ == "__main__":
    serve(parse_args())
