"""`make soak`: its judgement on figures made up here, what it found in the product,
and (slow) a short soak of this tree, clean and with a deliberate leak.

The short soak judges slopes as `make soak` does, on fewer listeners and a shorter run
(SHORT below); the clean tree must pass it and the leaking one fail, naming the figures
that grew.
"""

import os
import subprocess
import sys

import pytest

import chattle
from bench import soak
from harness import bench_server
from instruments.provenance import bench_environment, without_bench_environment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- the judgement ----------------------------------------------------------------------------

def test_a_flat_exact_count_passes_and_one_that_grows_by_one_per_minute_fails():
    flat = [(t, 6) for t in range(0, 300, 10)]
    growing = [(t, 6 + t // 60) for t in range(0, 300, 10)]
    assert soak.judge("descriptors", soak.EXACT, flat, 290, 100)["passed"]
    verdict = soak.judge("descriptors", soak.EXACT, growing, 290, 100)
    assert not verdict["passed"] and verdict["rise_high"] > soak.COUNT_TOLERANCE


def test_one_descriptor_opened_once_is_within_the_tolerance_wherever_it_falls():
    for step_at in (10, 150, 280):
        points = [(t, 6 + (t >= step_at)) for t in range(0, 300, 10)]
        assert soak.judge("descriptors", soak.EXACT, points, 290, 100)["passed"], step_at


def test_memory_is_judged_per_held_connection_hour():
    held = 1000
    within = [(t, 50e6 + t * (0.5 * soak.RSS_GATE * held / 3600)) for t in range(0, 300, 10)]
    beyond = [(t, 50e6 + t * (2 * soak.RSS_GATE * held / 3600)) for t in range(0, 300, 10)]
    assert soak.judge("rss", soak.MEMORY, within, 290, held)["passed"]
    assert not soak.judge("rss", soak.MEMORY, beyond, 290, held)["passed"]


def test_the_line_and_its_interval():
    line = soak.fit_line([(0, 1.0), (1, 3.0), (2, 5.0), (3, 7.0)])
    assert line["slope"] == pytest.approx(2.0) and line["intercept"] == pytest.approx(1.0)
    assert line["half_width"] == pytest.approx(0.0, abs=1e-9)
    assert soak.t_quantile(10) == pytest.approx(2.228, rel=0.005)
    assert soak.t_quantile(30) == pytest.approx(2.042, rel=0.005)


# -- what the soak found ----------------------------------------------------------------------

def test_a_room_emptied_by_the_retained_bound_while_a_poll_was_held_is_forgotten():
    """A left room whose messages the retained-bytes bound trimmed while a poll still
    waited there was skipped ever after (empty rooms may be loading), and stayed in the
    worker for good: one room per room ever left, the soak's "rooms above live"."""
    chattle.configure(chattle.Settings(max_retained_bytes=20000))
    try:
        bus, rooms = chattle.get_bus(), chattle.rooms
        for _ in range(30):
            bus.publish("left", "ann", "x" * 80)
        rooms.get("left").waiting = 1      # a poll still held there when the bound is reached
        for _ in range(200):
            bus.publish("live", "ann", "x" * 80)
        rooms.get("left").waiting = 0      # it times out: nobody waits any more
        for _ in range(200):
            bus.publish("live", "ann", "x" * 80)
        assert "left" not in rooms.by_name
        assert "live" in rooms.by_name and rooms.retained_bytes <= 20000
    finally:
        chattle.configure(chattle.Settings())


# -- a short soak, for real -------------------------------------------------------------------

# make soak's judgement on a shorter run: 300 listeners, 30 s of steady load (after 30 s
# of warm-up: a fresh load process still grows for a while) sampled every
# 1.5 s. Counts keep make soak's gates; memory gets 128 KiB per held connection per hour
# (make soak: 1 KiB), since 30 s of samples cannot resolve less than tens of KiB an hour
# against RSS's page-sized steps. The leak below grows by about 1 KB per request, some
# MiB per connection-hour, and one descriptor per 20 requests.
SHORT = ["--duration", "60", "--warm-up", "30", "--prime", "5", "--sample-every", "1.5", "--listeners", "300",
         "--poll-timeout", "5", "--room-life", "15", "--idle-wait", "25", "--rss-gate", str(128 * 1024),
         # the load process's own warm-up outlasts 30 s (seen at 110 KiB per connection-hour once); the
         # server's must not, and the full soak judges the load process by --rss-gate
         "--load-rss-gate", str(512 * 1024)]
LEAK = {"CHATTLE_BENCH_LEAK": "requests,sockets"}


def start_soak(out, extra_env, extra_args=()):
    env = without_bench_environment()
    env.update(extra_env)
    with open(out / "output.txt", "w") as output:
        return subprocess.Popen([sys.executable, "-m", "bench.soak", *SHORT, *extra_args, "--out", str(out)], cwd=ROOT,
                                env=env, stdout=output, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def soaks(tmp_path_factory):
    """The clean tree and the leaking one, soaked side by side (each a server and a load
    process of its own): {name: (exit code, output)}."""
    outs = {"clean": tmp_path_factory.mktemp("clean"), "leak": tmp_path_factory.mktemp("leak")}
    # The leak never returns to idle, after the priming or after the load, so it would sit
    # out the whole --idle-wait twice, for figures its test does not judge.
    runs = {"clean": start_soak(outs["clean"], {}), "leak": start_soak(outs["leak"], LEAK, ["--idle-wait", "4"])}
    try:
        codes = {name: run.wait(300) for name, run in runs.items()}
        return {name: (codes[name], (outs[name] / "output.txt").read_text()) for name in runs}
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait(10)


@pytest.mark.slow
def test_the_clean_tree_passes_a_short_soak(soaks):
    code, output = soaks["clean"]
    print(output)
    assert code == 0, output
    assert "soak: PASSED" in output


@pytest.mark.slow
def test_a_leak_fails_a_short_soak_naming_the_figures_that_grew(soaks):
    code, output = soaks["leak"]
    print(output)
    assert code == 1, output
    failed = [line for line in output.splitlines() if line.startswith("soak: FAILED:")]
    assert failed, output
    assert "worker 1 rss" in failed[0], "the kept requests must show as memory: " + failed[0]
    assert "worker 1 descriptors beyond connections" in failed[0], "the sockets must show: " + failed[0]


# -- the faults reach whichever process serves ----------------------------------------------

@pytest.mark.parametrize("gunicorn", [False, True], ids=["python chattle.py", "gunicorn"])
def test_a_leak_asked_for_reaches_the_server_and_grows_by_one_descriptor_per_request(tmp_path, gunicorn):
    from harness.processes import ChattleServer, get_json
    server = ChattleServer(gunicorn=gunicorn, env={"CHATTLE_BENCH_LEAK": "sockets"},
                           log_path=str(tmp_path / "server.log"))
    try:
        assert server.faulted and any("bench_server" in part for part in server.argv)

        def beyond():
            status, stats = get_json(server.url + "/stats")
            assert status == 200
            return stats["descriptors"] - stats["connections"]

        before = beyond()
        every = bench_server.LeakPerRequest.SOCKET_EVERY
        for _ in range(3 * every):
            assert get_json(server.url + "/rooms/leak/msgs?timeout=0")[0] == 200
        assert beyond() == before + 3
    finally:
        server.stop()


def test_a_clean_server_is_chattle_itself(tmp_path):
    from harness.processes import ChattleServer
    env = dict.fromkeys(bench_environment(), "")
    server = ChattleServer(env=env, log_path=str(tmp_path / "server.log"))
    try:
        assert not server.faulted and server.argv[1].endswith("chattle.py")
    finally:
        server.stop()
