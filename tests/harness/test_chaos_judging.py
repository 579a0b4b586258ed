"""The judging of `make load CHAOS=` (instruments/judging.py, loadtests/faults.py) on made-up
ledgers and on one recorded from a real run: delivered, signalled, lost silently, duplicated,
across histories that start again, with and without the server's epoch token."""

import json
import os

import pytest

from instruments.judging import first_served, judge_listener, judge_run, split_histories
from loadtests import faults, run
from loadtests.faults import chaos_row, parse_chaos, table_html, table_lines
from loadtests.tally import RunTally

HERE = os.path.dirname(os.path.abspath(__file__))


def posts(room, first_id, last_id, start_ts, epoch=None, step=1.0):
    """Accepted posts [room, id, ts, epoch], one every `step` seconds from `start_ts`."""
    return [[room, message_id, start_ts + step * (message_id - first_id), epoch]
            for message_id in range(first_id, last_id + 1)]


def got(accepted, ids=None):
    """Receipts [id, ts] of `accepted` (all, or those with an id in `ids`)."""
    return [[message_id, ts] for _room, message_id, ts, _epoch in accepted if ids is None or message_id in ids]


def segment(start, began, until=None, receipts=(), epoch=None, missed=()):
    return {"epoch": epoch, "start": start, "from": began, "until": until, "got": list(receipts),
            "missed": [list(entry) for entry in missed]}


def listener(room, *segments, stopped_at=1e9, name="l"):
    return {"listener": name, "room": room, "segments": list(segments), "stopped_at": stopped_at}


def test_a_listener_that_got_everything_owes_nothing():
    accepted = posts("r", 1, 10, 100.0)
    judged = judge_run([listener("r", segment(0, 99.0, receipts=got(accepted)))], accepted)["totals"]
    assert (judged["owed"], judged["delivered"], judged["lost"], judged["signalled"]) == (10, 10, 0, 0)


def test_what_came_before_the_cursor_at_the_start_is_not_owed():
    accepted = posts("r", 1, 10, 100.0)
    judged = judge_run([listener("r", segment(4, 104.5, receipts=got(accepted, range(5, 11))))], accepted)
    assert judged["totals"]["owed"] == 6 and judged["totals"]["lost"] == 0


def test_a_gap_nobody_told_of_is_lost_silently_and_named():
    accepted = posts("r", 1, 10, 100.0)
    judged = judge_run([listener("r", segment(0, 99.0, receipts=got(accepted, {1, 2, 3, 6, 7, 8, 9, 10})))],
                       accepted)
    assert judged["totals"]["lost"] == 2 and judged["listeners"][0]["lost_posts"] == [["#0", 4], ["#0", 5]]


def test_a_gap_covered_by_missed_is_signalled_and_one_outside_it_is_not():
    accepted = posts("r", 1, 10, 100.0)
    # told at 112 that the 2 after id 3 are gone: 4 and 5 signalled, 8 not covered
    judged = judge_listener(listener("r", segment(0, 99.0, receipts=got(accepted, {1, 2, 3, 6, 7, 9, 10}),
                                                  missed=[(112.0, 3, 2)])), split_histories(accepted)["r"])
    assert (judged["signalled"], judged["lost"], judged["lost_posts"]) == (2, 1, [["#0", 8]])


def test_a_missed_told_before_the_post_was_accepted_covers_nothing():
    accepted = posts("r", 1, 5, 100.0)
    judged = judge_listener(listener("r", segment(0, 99.0, receipts=got(accepted, {1, 2, 3}),
                                                  missed=[(101.5, 3, 2)])), split_histories(accepted)["r"])
    assert judged["lost"] == 2 and judged["signalled"] == 0


def test_a_reset_mid_run_signals_the_old_history_and_owes_the_new_one_after_its_cursor():
    old = posts("r", 1, 10, 100.0)              # history #0
    new = posts("r", 1, 6, 120.0)               # the history started again: ids from 1
    # got 1..7 of the old one, told reset at 121.5 with cursor 2 (posts 1, 2 of the new one
    # accepted before), then got 3..6 of the new one
    judged = judge_run([listener("r", segment(0, 99.0, until=121.5, receipts=got(old, range(1, 8))),
                                 segment(2, 121.5, receipts=got(new, range(3, 7))))], old + new)["totals"]
    assert judged["histories"] == {"r": 2}
    # owed: the old history's 10; of the new one, ids 1 and 2 (accepted while the first
    # segment lasted, signalled by the reset) and 3..6 after the reset's cursor
    assert (judged["owed"], judged["delivered"], judged["signalled"], judged["lost"]) == (16, 11, 5, 0)


def test_a_held_poll_that_silently_misses_a_new_history_below_its_cursor_is_caught():
    """The known loss on a Redis restart without persistence: a listener at cursor 20
    keeps polling since=20; the room starts again from 1, and the first post it is given is
    the new 21, as if nothing happened. Ids alone say it is complete; (id, ts) say 1..20 of
    the new history were lost without a word."""
    old = posts("r", 1, 20, 100.0)
    new = posts("r", 1, 25, 130.0)
    receipts = got(old) + got(new, range(21, 26))
    judged = judge_run([listener("r", segment(0, 99.0, receipts=receipts))], old + new)
    totals = judged["totals"]
    assert (totals["owed"], totals["delivered"], totals["lost"], totals["signalled"]) == (45, 25, 20, 0)
    assert judged["listeners"][0]["lost_posts"][:2] == [["#1", 1], ["#1", 2]]
    assert totals["duplicated"] == 0    # the new 1..20 are not the old 1..20 received again


def test_the_same_listener_told_reset_after_the_restart_loses_nothing():
    old = posts("r", 1, 20, 100.0)
    new = posts("r", 1, 25, 130.0)
    judged = judge_run([listener("r", segment(0, 99.0, until=131.5, receipts=got(old)),
                                 segment(2, 131.5, receipts=got(new, range(3, 26))))], old + new)["totals"]
    assert judged["lost"] == 0 and judged["signalled"] == 2 and judged["delivered"] == 43


def test_epochs_key_the_histories_and_place_a_segment_without_receipts():
    old = posts("r", 1, 5, 100.0, epoch="a")
    new = posts("r", 1, 5, 110.0, epoch="b")
    histories = split_histories(old + new)["r"]
    assert [history["key"] for history in histories] == ["a", "b"]
    # told reset into "b" before any post of it: owes b's 1..5, received none of them
    judged = judge_listener(listener("r", segment(0, 99.0, until=109.0, receipts=got(old), epoch="a"),
                                     segment(0, 109.0, epoch="b")), histories)
    assert (judged["owed"], judged["delivered"], judged["lost"]) == (10, 5, 5)


def test_epochs_keep_histories_apart_even_when_their_posts_interleave():
    # two posters' answers cross: ts order mixes the histories, the epochs do not
    accepted = [["r", 1, 100.0, "a"], ["r", 1, 100.5, "b"], ["r", 2, 101.0, "a"], ["r", 2, 101.5, "b"]]
    assert [sorted(history["posts"]) for history in split_histories(accepted)["r"]] == [[1, 2], [1, 2]]


def test_duplicates_and_order_are_counted_per_listener():
    accepted = posts("r", 1, 5, 100.0)
    receipts = got(accepted) + got(accepted, {3})
    judged = judge_run([listener("r", segment(0, 99.0, receipts=receipts))], accepted)["totals"]
    assert judged["duplicated"] == 1 and judged["out_of_order"] == 1 and judged["lost"] == 0


def test_posts_after_a_listener_stopped_or_vanished_are_not_owed():
    accepted = posts("r", 1, 10, 100.0)
    stopped = listener("r", segment(0, 99.0, receipts=got(accepted, range(1, 6))), stopped_at=104.5)
    gone = dict(listener("r", segment(0, 99.0)), vanished=True)
    judged = judge_run([stopped, gone], accepted)["totals"]
    assert judged["listeners"] == 1 and judged["owed"] == 5 and judged["lost"] == 0


def test_a_received_message_no_poster_heard_of_is_counted_apart():
    accepted = posts("r", 1, 3, 100.0)
    receipts = got(accepted) + [[4, 103.0]]   # a post whose 201 never reached its poster
    judged = judge_run([listener("r", segment(0, 99.0, receipts=receipts))], accepted)["totals"]
    assert judged["unknown"] == 1 and judged["lost"] == 0


def test_service_is_back_at_the_first_post_after_the_fault_that_someone_received():
    accepted = posts("r", 1, 10, 100.0)
    received = [listener("r", segment(0, 99.0, receipts=got(accepted, {1, 2, 7, 8})))]
    assert first_served(accepted, received, after=102.5) == 106.0
    assert first_served(accepted, received, after=108.5) is None


# -- a ledger recorded from a real run ------------------------------------------------------------

def test_a_recorded_redis_restart_tells_the_silent_loss_from_the_signalled_one():
    """tests/harness/data/redis_restart_ledgers.json: two listeners and every accepted post of a real
    `--chaos redis-restart` run on the server as it was (no epoch). In load-0 the held poll
    was given the new history's ids past its cursor as news: the posts of the new history up
    to its old cursor were lost silently. In load-1 the listener was told reset: signalled."""
    with open(os.path.join(HERE, "data", "redis_restart_ledgers.json")) as recorded:
        scenario = json.load(recorded)
    histories = split_histories(scenario["posts"])
    assert [len(histories[room]) for room in ("load-0", "load-1")] == [2, 2]
    silent, told = (judge_listener(entry, histories[entry["room"]]) for entry in scenario["listeners"])
    assert silent["lost"] == 15 and silent["signalled"] == 0 and silent["duplicated"] == 0
    assert all(key == "#1" for key, _id in silent["lost_posts"])
    assert silent["delivered"] + silent["lost"] == silent["owed"]
    assert told["lost"] == 0 and told["signalled"] == 5 and told["delivered"] + told["signalled"] == told["owed"]


# -- the row and the table -------------------------------------------------------------------------

def tally_of(listeners, accepted, refusals=()):
    tally = RunTally()
    tally.listeners, tally.posts, tally.refusals = listeners, accepted, list(refusals)
    return tally


def test_a_row_fails_on_silent_loss_and_counts_refusals_apart_from_unknown_outcomes():
    old, new = posts("load-0", 1, 20, 100.0), posts("load-0", 1, 25, 130.0)
    tally = tally_of([listener("load-0", segment(0, 99.0, receipts=got(old) + got(new, range(21, 26))))],
                     old + new, [[125.0, "load-0", 503, False], [125.2, "load-0", 503, True],
                                 [125.4, "load-0", None, False]])
    row = chaos_row("redis-restart", {"injected_at": 125.0, "harness_done_at": 126.0}, tally)
    assert not row["passed"] and "20 lost silently" in row["verdict"]
    assert (row["refused"], row["outcome_unknown"], row["no_answer"]) == (1, 1, 1)
    assert row["time_without_service_s"] == pytest.approx(150.0 - 125.0)   # new 21, the first received
    assert "redis-restart" in table_lines([row])[1] and "class=\"fail\"" in table_html([row])


def test_a_row_passes_when_all_was_delivered_and_service_came_back():
    accepted = posts("load-0", 1, 10, 100.0)
    row = chaos_row("worker-kill", {"injected_at": 104.5, "harness_done_at": 105.0},
                    tally_of([listener("load-0", segment(0, 99.0, receipts=got(accepted)))], accepted))
    assert row["passed"] and row["lost_silently"] == 0 and row["time_without_service_s"] == pytest.approx(0.5)


def test_a_post_accepted_before_the_fault_took_hold_is_not_service_restored():
    accepted = posts("load-0", 1, 10, 100.0)
    row = chaos_row("redis-restart-aof", {"injected_at": 103.9, "struck_at": 104.5, "harness_done_at": 105.0},
                    tally_of([listener("load-0", segment(0, 99.0, receipts=got(accepted)))], accepted))
    assert row["time_without_service_s"] == pytest.approx(105.0 - 103.9)   # not post 5's 0.1 s


def test_a_row_fails_when_service_never_came_back():
    accepted = posts("load-0", 1, 10, 100.0)
    row = chaos_row("redis-pause", {"injected_at": 104.5, "harness_done_at": 105.0},
                    tally_of([listener("load-0", segment(0, 99.0, receipts=got(accepted, range(1, 5))),
                                       stopped_at=104.6)], accepted))
    assert not row["passed"] and row["time_without_service_s"] is None and "not restored" in row["verdict"]


def test_room_evict_fails_a_row_when_no_room_was_forgotten():
    accepted = posts("load-0", 1, 3, 100.0)
    tally = tally_of([listener("load-0", segment(0, 99.0, receipts=got(accepted)))], accepted)
    idle = chaos_row("room-evict", {"injected_at": 100.5, "harness_done_at": 101.0, "rooms_forgotten": 0}, tally)
    evicted = chaos_row("room-evict", {"injected_at": 100.5, "harness_done_at": 101.0, "rooms_forgotten": 12}, tally)
    assert not idle["passed"] and "forgot no room" in idle["verdict"] and evicted["passed"]


def test_vanished_clients_fail_a_row_when_the_server_keeps_their_polls():
    accepted = posts("load-0", 1, 3, 100.0)
    tally = tally_of([listener("load-0", segment(0, 99.0, receipts=got(accepted)))], accepted)
    kept = chaos_row("vanished-clients", {"injected_at": 100.5, "harness_done_at": 101.0, "vanished": 40,
                                          "released_after_s": None}, tally)
    released = chaos_row("vanished-clients", {"injected_at": 100.5, "harness_done_at": 101.0, "vanished": 40,
                                              "released_after_s": 0.4}, tally)
    assert not kept["passed"] and "did not drop" in kept["verdict"] and released["passed"]


# -- CHAOS= itself ---------------------------------------------------------------------------------

def test_chaos_names_all_or_a_list_and_refuses_unknown_faults():
    assert parse_chaos("all") == list(faults.ALL) and len(faults.ALL) >= 12
    assert parse_chaos("worker-kill, redis-pause") == ["worker-kill", "redis-pause"]
    assert parse_chaos("failover") == ["cluster-failover"]
    with pytest.raises(ValueError, match="unknown fault nope"):
        parse_chaos("worker-kill,nope")


@pytest.mark.parametrize("argv,said", [
    (["--chaos", "nope"], "unknown fault nope"),
    (["--chaos", "worker-kill"], "worker-kill needs WORKERS=2"),
    (["--chaos", "redis-restart", "--workers", "2", "--redis-cluster", "local"], "not REDIS_CLUSTER"),
    (["--chaos", "vanished-clients", "--host", "http://127.0.0.1:1"], "not with HOST="),
])
def test_a_fault_that_cannot_run_is_refused_with_the_reason(argv, said):
    problems = run.cluster_problems(run.parse_args(argv))
    assert any(said in problem for problem in problems), problems


def test_chaos_runs_are_short_by_default_and_plain_runs_keep_theirs():
    chaos, plain = run.parse_args(["--chaos", "worker-kill"]), run.parse_args([])
    assert (chaos.users, chaos.duration, chaos.poll_timeout) == (2000, 60.0, 5.0)
    assert (plain.users, plain.duration, plain.poll_timeout) == (10000, 150.0, 20.0)


def test_the_matrix_refuses_at_once_what_cannot_run_and_starts_nothing(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    done = subprocess.run([sys.executable, "-m", "loadtests.run", "--chaos", "all", "--workers", "1",
                           "--report-root", str(tmp_path / "reports")], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "redis-restart needs WORKERS=2" in done.stderr and "worker-kill needs WORKERS=2" in done.stderr
    assert "vanished-clients" not in done.stderr     # it runs on python chattle.py
    assert not (tmp_path / "reports").exists()


# -- the listener's side: the history's token ---------------------------------------------------------

def test_a_listener_sends_the_epoch_once_an_answer_named_one_and_none_before():
    """The held poll's request is request_head + cursor + request_tail, read at each send:
    once the first answer (or a reset) names the history, every next poll carries it."""
    import socket
    import types

    from loadtests.locustfile import Listener, ParsedAnswers
    from loadtests.longpoll import HeldPoll

    ours, theirs = socket.socketpair()
    try:
        held = HeldPoll(ours, b"GET /rooms/r/msgs?since=", b"&timeout=5 HTTP/1.1\r\nHost: h\r\n\r\n",
                        None, None)
        listener = types.SimpleNamespace(epoch=None, poll_timeout=5.0, held=held,
                                         client=types.SimpleNamespace(host_header="h"))
        listener._after_cursor = lambda: Listener._after_cursor(listener)
        assert listener._after_cursor() == "&timeout=5"
        Listener._took_epoch(listener, ParsedAnswers().epoch(b'{"messages": [], "cursor": 3}'))
        assert held.send(3) and theirs.recv(4096) == b"GET /rooms/r/msgs?since=3&timeout=5 HTTP/1.1\r\nHost: h\r\n\r\n"
        Listener._took_epoch(listener, ParsedAnswers().epoch(b'{"messages": [], "cursor": 0, "reset": true, '
                                                             b'"epoch": "a/b 1"}'))
        assert held.send(0)
        assert theirs.recv(4096) == b"GET /rooms/r/msgs?since=0&epoch=a%2Fb%201&timeout=5 HTTP/1.1\r\nHost: h\r\n\r\n"
    finally:
        ours.close()
        theirs.close()
