"""make load-calibrate's operating characteristic: kept per machine fingerprint, quoted by
every verdict on that machine, and made from calibration rounds by the verdict's own judge
and stopping rule (loadtests/calibration.py, loadtests/calibrate.py). No load runs: the
rounds are made up, seeded."""

import json
import random

import pytest

from harness import bench_server
from loadtests import calibrate, calibration
from tests.harness.test_compare import summary

THIS = {"id": "aaaa11112222", "cpu_model": "test cpu", "cores": 2}
OTHER = {"id": "bbbb33334444", "cpu_model": "another cpu", "cores": 64}


def entry(machine=THIS, false_alarms=1, comparisons=20):
    return {"machine": machine, "machine_id": machine["id"], "date": "2026-12-08T02:00:00+00:00",
            "commit": "0123456789abcdef", "settings": {"users": 1000, "duration": 25.0}, "min_rounds": 3,
            "max_rounds": 6, "arms": {
                "aa": {"label": "A/A", "real": {"called_worse": 0, "comparisons": 3},
                       "pooled": {"called_worse": false_alarms, "comparisons": comparisons}},
                "cpu10": {"label": "+10 % CPU", "real": {"called_worse": 2, "comparisons": 3},
                          "pooled": {"called_worse": 9, "comparisons": 10}}}}


def test_without_a_calibration_the_verdict_says_so(tmp_path):
    quote = calibration.quote_for(THIS, path=str(tmp_path / "calibration.json"), kept_path=None)
    assert quote.startswith("no calibration for this machine (aaaa11112222)")


def test_a_verdict_quotes_its_own_machines_calibration(tmp_path):
    path = str(tmp_path / "calibration.json")
    calibration.save(entry(), path)
    quote = calibration.quote_for(THIS, path=path, kept_path=None)
    assert "false alarms: 0 of 3 [0-56%] real, 1 of 20 [1-24%] pooled" in quote
    assert "+10 % CPU caught: 2 of 3 real, 9 of 10 pooled" in quote
    assert "calibrated 2026-12-08 at 0123456789ab, DURATION=25.0 USERS=1000, rounds 3 to 6" in quote


def test_another_machines_calibration_is_not_quoted(tmp_path):
    path = str(tmp_path / "calibration.json")
    calibration.save(entry(machine=OTHER), path)
    assert calibration.quote_for(THIS, path=path, kept_path=None).startswith("no calibration for this machine")
    calibration.save(entry(machine=THIS, false_alarms=2), path)
    with open(path) as data:
        kept = json.load(data)["machines"]
    assert set(kept) == {THIS["id"], OTHER["id"]}   # one machine's calibration leaves the other's
    assert "2 of 20" in calibration.quote_for(THIS, path=path, kept_path=None)
    assert "1 of 20" in calibration.quote_for(OTHER, path=path, kept_path=None)


def test_a_fresh_clone_quotes_the_calibration_kept_with_the_docs_for_its_machine(tmp_path):
    kept = tmp_path / "kept.json"
    kept.write_text(json.dumps(entry()))          # one machine's entry, as docs/runs/ keeps it
    missing = str(tmp_path / "reports" / "calibration.json")
    assert "1 of 20" in calibration.quote_for(THIS, path=missing, kept_path=str(kept))
    assert calibration.quote_for(OTHER, path=missing, kept_path=str(kept)).startswith("no calibration")
    calibration.save(entry(false_alarms=3), missing)   # the machine's own calibration comes first
    assert "3 of 20" in calibration.quote_for(THIS, path=missing, kept_path=str(kept))


def test_an_unreadable_calibration_is_none(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text("{not json")
    assert calibration.quote_for(THIS, path=str(path), kept_path=None).startswith("no calibration")


def test_the_false_alarm_interval_is_wilsons():
    low, high = calibration.wilson(1, 20)
    assert low == pytest.approx(0.0089, abs=0.0005) and high == pytest.approx(0.2361, abs=0.0005)
    assert calibration.wilson(0, 0) == (0.0, 1.0)


def made_up_rounds(count, seed=1, noise=0.01):
    """Calibration rounds: a plain run and one per arm, each arm's figures its slowdown off
    the plain run's, with a drift shared by the round and each run's own noise."""
    draw = random.Random(seed)
    factors = {"aa": (1.0, 1.0), "cpu20": (1.25, 1.0), "latency": (1.0, 1.4)}
    rounds = []
    for _ in range(count):
        drift = 1 + draw.gauss(0, 0.05)

        def run(cpu, latency, drift=drift):
            return summary(cpu_us=60 * drift * cpu * (1 + draw.gauss(0, noise)),
                           p50_ms=20 * drift * latency * (1 + draw.gauss(0, noise)),
                           p99_ms=40 * drift * latency * (1 + draw.gauss(0, noise)),
                           kib=7 * (1 + draw.gauss(0, noise / 4)), server_cpu_s=30.0)
        runs = {"base": run(1.0, 1.0)}
        runs.update({key: run(*factor) for key, factor in factors.items()})
        rounds.append({"runs": runs})
    return rounds


ARMS = (("aa", "A/A", {}, None), ("cpu20", "+20 % CPU", {}, "cpu"), ("latency", "latency", {}, "latency"))


def test_the_characteristic_counts_false_alarms_and_catches_as_the_verdict_judges():
    arms = calibrate.characteristic(made_up_rounds(9), 3, 6, pooled=30, arms=ARMS, resamples=200)
    assert arms["aa"]["real"]["called_worse"] == 0 and arms["aa"]["pooled"]["called_worse"] == 0
    assert arms["cpu20"]["real"]["called_worse"] == arms["cpu20"]["real"]["comparisons"] == 3
    assert arms["cpu20"]["pooled"] == {"called_worse": 30, "comparisons": 30, "could_not_compare": 0,
                                       "rounds_used": 3.0}
    assert arms["latency"]["pooled"]["called_worse"] == 30
    assert arms["cpu20"]["effect"]["server_us_per_delivery"] == pytest.approx(1.25, abs=0.02)
    assert arms["latency"]["effect"]["server_us_per_delivery"] == pytest.approx(1.0, abs=0.02)


def test_real_comparisons_never_share_a_round_and_pooled_ones_are_seeded():
    pairs = calibrate.pairs_of(made_up_rounds(8, noise=0.06), "aa")
    words, used = calibrate.real_comparisons(pairs, 3, 6, resamples=200)
    assert sum(used) <= 8 and all(3 <= count <= 6 for count in used)
    first = calibrate.pooled_comparisons(pairs, 3, 6, 10, seed=4, resamples=200)
    assert first == calibrate.pooled_comparisons(pairs, 3, 6, 10, seed=4, resamples=200)
    assert len(first[0]) == 10


def test_too_few_rounds_make_no_comparison():
    pairs = calibrate.pairs_of(made_up_rounds(2), "aa")
    assert calibrate.real_comparisons(pairs, 3, 6, resamples=200) == ([], [])
    assert calibrate.tally([], [])["comparisons"] == 0


def test_no_early_stamp_unless_asked_and_a_bad_one_stops_the_server():
    assert bench_server.install_stamp_early({}) is None
    with pytest.raises(SystemExit, match=bench_server.STAMP_EARLY_VARIABLE):
        bench_server.install_stamp_early({bench_server.STAMP_EARLY_VARIABLE: "soon"})


def test_an_early_stamp_moves_the_messages_ts_and_not_the_bus_clock():
    import time

    import chattle_bus
    from chattle_rooms import Rooms

    bus = chattle_bus.MemoryBus(Rooms(history=100))
    early = bench_server.install_stamp_early({bench_server.STAMP_EARLY_VARIABLE: "4000"}, bus_module=chattle_bus)
    try:
        before = time.time()
        message = bus.publish("calibration-room", "tester", "hello")
        assert before - 4.5 < message["ts"] < time.time() - 3.5   # 4 s early
        assert abs(bus.clock() - time.time()) < 1.0               # the clock stays true
    finally:
        early.remove(chattle_bus)
    assert abs(bus.publish("calibration-room", "tester", "again")["ts"] - time.time()) < 1.0
    assert bus.clock is not None and chattle_bus.time is time


def test_a_calibration_is_recorded_under_its_machine_drawn_and_rendered_for_the_docs(tmp_path):
    import argparse

    from loadtests.calibration_results import section

    args = argparse.Namespace(rounds=3, max_rounds=6, pooled=20, output=str(tmp_path / "calibration.json"))
    rounds = made_up_rounds(6)
    for entry in rounds:
        entry.update(order=list(entry["runs"]), canary=[{"loop_s": 0.02, "others_percent": 0, "steal_percent": 0}])
        for key in ("cpu5", "cpu10"):
            entry["runs"][key] = entry["runs"]["cpu20"]
    made = calibrate.record(rounds, args, {"users": 1000, "duration": 25.0, "burst_gap": 1.0},
                            {"machine": THIS, "date": "2026-12-08T02:30:00+00:00", "commit": "0123456789abcdef",
                             "order_seed": 5, "discarded_rounds": 0, "elapsed_s": 1234.0,
                             "command": calibrate.as_make_command(["--users", "1000", "--lock", "/x"])}, [34.0] * 36)
    assert made["command"] == "make load-calibrate USERS=1000 LOCK=/x"
    assert made["seconds_per_comparison"] == pytest.approx(34.0 * 2 * made["arms"]["aa"]["pooled"]["rounds_used"])
    assert (tmp_path / "calibration.png").stat().st_size > 1000
    quote = calibration.quote_for(THIS, path=args.output, kept_path=None)
    assert "false alarms: 0 of 1 [0-79%] real, 0 of 20 [0-16%] pooled" in quote
    lines = "\n".join(section(made))
    assert "| A/A (false alarms) | CPU " in lines and "| 0 of 20 (0-16 %) |" in lines
    assert "commit 0123456, test cpu (2 cores), machine fingerprint aaaa11112222; 6 rounds" in lines
    assert "A/A spread of one round's head / base (standard deviation of its log): CPU " in lines


def calibration_report(report, rounds):
    """A finished calibration's report directory with the runs of `rounds`."""
    for number, entry in enumerate(rounds, 1):
        for name, run in entry["runs"].items():
            label = "2b" if number == 2 else str(number)
            where = report / "rounds" / ("%s-%s" % (label, name)) / "latest"
            where.mkdir(parents=True)
            (where / "summary.json").write_text(json.dumps(run))
    (report / "rounds" / "2-base").mkdir()    # the first attempt of round 2: left out
    kept = {"machine": THIS, "date": "2026-12-08T02:20:31+00:00", "commit": "0123456789abcdef", "order_seed": 1,
            "discarded_rounds": 1, "elapsed_s": 900.0, "command": "make load-calibrate USERS=1000",
            "seconds_per_run": 34.0, "all_settings": {"users": 1000, "duration": 25.0, "burst_gap": 1.0},
            "rounds": [{"order": list(entry["runs"])} for entry in rounds],
            "canary": [[{"loop_s": 0.02}]] * len(rounds)}
    (report / "calibration.json").write_text(json.dumps(kept))


def test_a_finished_calibration_is_judged_again_from_its_runs(tmp_path):
    """--rejudge: the comparisons made again from the runs a calibration's report keeps (a
    round run again, 2b, stands for round 2), as this tree judges them."""
    report = tmp_path / "20261208-022031-calibrate"
    calibration_report(report, made_up_rounds(4))
    output = tmp_path / "calibration.json"
    assert calibrate.main(["--rejudge", str(report), "--output", str(output), "--pooled", "10"]) == 0
    entry = json.loads((report / "calibration.json").read_text())
    assert entry["calibration_rounds"] == 4 and entry["judged_at"] and entry["commit"] == "0123456789abcdef"
    assert entry["arms"]["cpu20"]["real"] == {"called_worse": 1, "comparisons": 1, "could_not_compare": 0,
                                              "rounds_used": 3.0}
    assert "cpu20" in json.loads(output.read_text())["machines"][THIS["id"]]["arms"]


def test_a_round_not_valid_for_an_arm_is_left_out_of_its_comparisons():
    rounds = made_up_rounds(7)
    rounds[2]["runs"]["cpu20"]["machine_check"]["machine_bound"] = True
    arms = calibrate.characteristic(rounds, 3, 6, pooled=10, arms=ARMS, resamples=200)
    assert arms["cpu20"]["invalid_rounds"] == 1 and arms["aa"]["invalid_rounds"] == 0
    assert arms["cpu20"]["pooled"]["could_not_compare"] == 0 and arms["cpu20"]["real"]["comparisons"] == 2


def test_chunks_of_a_calibration_are_judged_together(tmp_path):
    calibration_report(tmp_path / "first", made_up_rounds(4, seed=1))
    calibration_report(tmp_path / "second", made_up_rounds(5, seed=2))
    output = tmp_path / "calibration.json"
    assert calibrate.main(["--rejudge", str(tmp_path / "first"), str(tmp_path / "second"), "--output", str(output),
                           "--pooled", "10"]) == 0
    entry = json.loads(output.read_text())["machines"][THIS["id"]]
    assert entry["calibration_rounds"] == 9 and [chunk["rounds"] for chunk in entry["chunks"]] == [4, 5]
    assert entry["elapsed_s"] == 1800.0 and entry["discarded_rounds"] == 2
    assert entry["arms"]["cpu20"]["real"]["comparisons"] == 3
