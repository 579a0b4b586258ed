"""Chattle load scenarios: Listeners hold long-polls on their room for the whole run,
Posters post in bursts; the stages come from loadtests/shapes.py.

Wake-up latency and delivery completeness are not Locust request stats: each Locust
process keeps them at full precision and writes them to `<raw-dir>/locust-<pid>.json`
when it stops; loadtests/run.py merges the files into the report. Run it through
`make load` (python -m loadtests.run), which starts the server and sets the options.
"""

import itertools
import json
import os
import random
import time
from array import array

from locust import constant, events, task
from locust.contrib.fasthttp import FastHttpUser

from bench.measures import DeliveryLedger, wakeup_latency
from harness.processes import get_json
from loadtests.scenario import CLIENT_TIMEOUT_MARGIN, build_stages, room_name, stage_at
from loadtests.shapes import StagedShape  # noqa: F401  (Locust finds the shape in the locustfile)

CATCH_UP_POLLS = 20        # answers of up to 1000 messages each, when a listener stops
CATCH_UP_TIMEOUT = 15.0


@events.init_command_line_parser.add_listener
def add_options(parser):
    group = parser.add_argument_group("chattle")
    group.add_argument("--listeners", type=int, default=2000, help="listeners held at the target")
    group.add_argument("--posters", type=int, default=1, help="posters (fixed count, spawned first)")
    group.add_argument("--rooms", type=int, default=1, help="rooms; listeners are spread evenly over them")
    group.add_argument("--run-seconds", type=float, default=110, help="length of the whole stage table")
    group.add_argument("--poll-timeout", type=float, default=20, help="the 'timeout' each poll asks the server for")
    group.add_argument("--burst-size", type=int, default=5, help="messages a poster sends back to back")
    group.add_argument("--burst-gap", type=float, default=8, help="mean seconds of quiet between a poster's bursts")
    group.add_argument("--raw-dir", default="", help="where each Locust process writes its latencies and ledgers")


# -- what this process saw, written out when it stops --------------------------------------------

class Seen:
    listeners = []                 # one dict per listener started in this process
    posts = []                     # [room, id, ts] of every accepted post
    errors = []                    # [time, who, what]
    received_at = array("d")       # per delivered message: when it arrived ...
    latency = array("d")           # ... and its wake-up latency, full precision
    test_started = None
    listener_numbers = itertools.count()
    poster_numbers = itertools.count()


@events.init.add_listener
def apply_timeouts(environment, **_kwargs):
    options = environment.parsed_options
    if options is None:
        return
    # A poll the server holds for poll_timeout must not be cut by the client first: a
    # silent cap at the client timeout would look like a server that never answers.
    Listener.network_timeout = options.poll_timeout + CLIENT_TIMEOUT_MARGIN
    Listener.connection_timeout = options.poll_timeout + CLIENT_TIMEOUT_MARGIN
    Poster.fixed_count = options.posters


@events.test_start.add_listener
def remember_start(**_kwargs):
    Seen.test_started = time.time()


@events.test_stop.add_listener
@events.quitting.add_listener
def write_raw(environment, **_kwargs):
    raw_dir = environment.parsed_options.raw_dir if environment.parsed_options else ""
    if not raw_dir or not (Seen.listeners or Seen.posts or Seen.errors):
        return
    os.makedirs(raw_dir, exist_ok=True)
    listeners = []
    for entry in Seen.listeners:
        ledger = entry["ledger"]
        listeners.append({"listener": entry["listener"], "room": entry["room"], "start": ledger.start,
                          "next_expected": ledger.next_expected, "received": ledger.received,
                          "duplicated": ledger.duplicated, "out_of_order": ledger.out_of_order,
                          "missed_reported": ledger.missed_reported, "gaps": sorted(ledger._gaps),
                          "latencies": entry["latencies"], "polls": entry["polls"]})
    data = {"pid": os.getpid(), "test_started": Seen.test_started, "listeners": listeners, "posts": Seen.posts,
            "errors": Seen.errors, "received_at": list(Seen.received_at), "latency": list(Seen.latency)}
    path = os.path.join(raw_dir, "locust-%d.json" % os.getpid())
    with open(path + ".tmp", "w") as out:
        json.dump(data, out)
    os.replace(path + ".tmp", path)


# -- the users ------------------------------------------------------------------------------------

class Listener(FastHttpUser):
    """Long-polls one room with its cursor for the whole run and checks every id it gets."""

    weight = 1
    wait_time = constant(0)

    def on_start(self):
        options = self.environment.parsed_options
        number = next(Seen.listener_numbers)
        self.room = room_name(number % options.rooms)
        self.timeout = options.poll_timeout
        self.entry = None
        while self.entry is None:
            with self.client.get("/rooms/%s/msgs" % self.room, name="poll (first, no since)",
                                 catch_response=True) as answer:
                if answer.status_code != 200:
                    answer.failure("first poll answered %s" % answer.status_code)
                    Seen.errors.append([time.time(), "listener", "first poll: %s" % answer.status_code])
                    time.sleep(1)
                    continue
                cursor = answer.json()["cursor"]
            self.entry = {"listener": "%d-%d" % (os.getpid(), number), "room": self.room,
                          "ledger": DeliveryLedger(cursor), "latencies": 0, "polls": 0}
            Seen.listeners.append(self.entry)

    def on_stop(self):
        """Catch up before leaving: a listener stopped in the middle of a slow fan-out has not
        lost the messages still on their way, so fetch what the server holds (timeout=0)
        and judge completeness on that; a message the server no longer has stays lost."""
        if self.entry is None:
            return
        ledger = self.entry["ledger"]
        for _ in range(CATCH_UP_POLLS):
            url = "%s/rooms/%s/msgs?since=%d&timeout=0&limit=1000" % (self.host, self.room, ledger.next_expected - 1)
            try:
                status, body = get_json(url, timeout=CATCH_UP_TIMEOUT)
            except OSError as exc:
                Seen.errors.append([time.time(), "listener", "catch-up poll: %s" % exc])
                return
            if status != 200:
                Seen.errors.append([time.time(), "listener", "catch-up poll: %s" % status])
                return
            if not self.receive(body, time.time()):
                return

    def receive(self, body, received_at):
        """Record one poll answer; how many messages it held."""
        entry = self.entry
        ledger = entry["ledger"]
        entry["polls"] += 1
        if body.get("reset"):
            Seen.errors.append([received_at, "listener", "server answered reset: it lost the room's history"])
        ledger.missed_reported += body.get("missed", 0)
        for message in body["messages"]:
            ledger.record(message["id"])
            Seen.received_at.append(received_at)
            Seen.latency.append(wakeup_latency(received_at, message["ts"]))
            entry["latencies"] += 1
        return len(body["messages"])

    @task
    def poll(self):
        entry = self.entry
        ledger = entry["ledger"]
        url = "/rooms/%s/msgs?since=%d&timeout=%g" % (self.room, ledger.next_expected - 1, self.timeout)
        with self.client.get(url, name="poll (held)", catch_response=True) as answer:
            received_at = time.time()
            if answer.status_code != 200:
                answer.failure("poll answered %s" % answer.status_code)
                Seen.errors.append([received_at, "listener", "poll: %s %s" % (answer.status_code, answer.error)])
                time.sleep(1)
                return
            body = answer.json()
        self.receive(body, received_at)


class Poster(FastHttpUser):
    """Posts bursts (several messages back to back, then quiet) while a burst stage is on."""

    fixed_count = 1
    wait_time = constant(0)

    def on_start(self):
        options = self.environment.parsed_options
        self.number = next(Seen.poster_numbers)
        self.options = options
        self.stages = build_stages(options.listeners, options.posters, options.run_seconds, options.spawn_rate)
        self.next_room = self.number

    @task
    def burst(self):
        started = Seen.test_started or time.time()
        stage = stage_at(self.stages, time.time() - started)
        if stage is None or not stage["posting"]:
            time.sleep(0.25)
            return
        room = room_name(self.next_room % self.options.rooms)
        self.next_room += 1
        for sequence in range(self.options.burst_size):
            payload = {"from": "poster-%d" % self.number, "content": "burst message %d" % sequence}
            with self.client.post("/rooms/%s/msgs" % room, json=payload, name="post",
                                  catch_response=True) as answer:
                if answer.status_code != 201:
                    answer.failure("post answered %s" % answer.status_code)
                    Seen.errors.append([time.time(), "poster", "post: %s" % answer.status_code])
                    continue
                accepted = answer.json()
                Seen.posts.append([room, accepted["id"], accepted["ts"]])
        # Exponential gaps: bursts from several posters overlap sometimes, as in a real chat.
        time.sleep(random.expovariate(1.0 / self.options.burst_gap))
