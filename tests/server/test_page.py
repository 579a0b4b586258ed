"""The chat page: its template and assets in process, then two people chatting in real headless Chromium.

The browser runs in tests/server/page_driver.py, a plain Python subprocess: this process is
gevent-patched, and a subprocess also gives every browser step a hard time bound.
Set CHATTLE_SCREENSHOT=/tmp/chattle-page.png to keep a picture of the page (and a dark one).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import bottle
import pytest

import chattle

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page_driver.py")
XSS = "<img src=x onerror=alert(1)>"
HISTORY = 5        # retained per room; the burst below is bigger, so the page misses some
MISSED_BURST = 12
STEP_WAIT = 20     # seconds any one browser step may take on a loaded machine
DRIVER_DEADLINE = 120


# -- in process ------------------------------------------------------------------------------

def test_page_escapes_the_room_name():
    html = bottle.template("index", room="<b>x</b>", template_lookup=[chattle.VIEWS_ROOT])
    assert "<b>x</b>" not in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html


def test_page_and_assets_are_served_from_this_origin_only(wsgi):
    page = wsgi("GET", "/rooms/kitchen")
    assert page.status == 200
    html = page.body.decode()
    assert 'data-room="kitchen"' in html and "<template" in html
    # nothing fetched from elsewhere: every src and href is a local path or a data: URL
    for link in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert link.startswith("/static/") or link.startswith("data:"), link
    assert wsgi("GET", "/").status == 200
    for asset in re.findall(r'(?:src|href)="(/static/[^"]*)"', html):
        answer = wsgi("GET", asset)
        assert answer.status == 200, asset
        assert b"http://" not in answer.body and b"https://" not in answer.body, asset


def test_client_never_treats_content_as_html():
    with open(os.path.join(chattle.STATIC_ROOT, "chattle.js"), encoding="utf-8") as source:
        code = source.read()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in code, sink


# -- in Chromium -------------------------------------------------------------------------------

def run_driver_with_restart(start_chattle, tmp_path, chromium):
    """Run the page driver; when it is ready, restart the server (losing its memory) and let it go on."""
    server = start_chattle(extra_args=["--history", str(HISTORY)])
    handshake = tmp_path / "handshake"
    handshake.mkdir()
    argv = [sys.executable, DRIVER, "--url", server.url, "--chromium", chromium, "--room", "e2e",
            "--wait", str(STEP_WAIT), "--missed-burst", str(MISSED_BURST), "--handshake-dir", str(handshake)]
    if os.environ.get("CHATTLE_SCREENSHOT"):
        argv += ["--screenshot", os.environ["CHATTLE_SCREENSHOT"]]
    out_path, err_path = tmp_path / "driver.json", tmp_path / "driver.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        # its own process group: on a timeout the browser it started goes with it
        driver = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
        try:
            deadline = time.monotonic() + DRIVER_DEADLINE
            while not (handshake / "ready").exists() and driver.poll() is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if (handshake / "ready").exists():
                server.stop()
                start_chattle(port=server.port, extra_args=["--history", str(HISTORY)])
                (handshake / "go").touch()
            driver.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait(10)
                pytest.fail("the page driver did not finish in %ds\n%s"
                            % (DRIVER_DEADLINE, err_path.read_text(errors="replace")[-3000:]))
    text = out_path.read_text(errors="replace")
    try:
        observed = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        pytest.fail("the page driver printed no result (exit %s)\n%s\n%s"
                    % (driver.returncode, text[-2000:], err_path.read_text(errors="replace")[-3000:]))
    return observed


@pytest.mark.slow
def test_two_people_chat_in_headless_chromium(start_chattle, tmp_path, chromium):
    seen = run_driver_with_restart(start_chattle, tmp_path, chromium)
    assert "error" not in seen, "stage %s failed:\n%s" % (seen.get("stage"), seen.get("error"))
    assert seen["stage"] == "done"
    assert seen["page_errors"] == [] and seen["dialogs"] == []

    # the header names the room, and both pages say they are connected
    assert seen["header_room"] == "e2e" and "e2e" in seen["title"]
    assert seen["status_text"] == ["connected", "connected"]

    # history first, then long-polls from the cursor, asking for less than the page waits
    polls = seen["polls_ann"]
    assert len(polls) >= 2 and polls[0] == "/rooms/e2e/msgs"
    # with the history's epoch once an answer named one (the room has none before its first post)
    poll_url = re.compile(r"/rooms/e2e/msgs\?since=\d+&timeout=25(&epoch=[0-9a-f]{20})?")
    assert all(poll_url.fullmatch(url) for url in polls[1:]), polls
    assert any("&epoch=" in url for url in polls), polls

    # typed in one page with Enter, shown in the other, as the sender's own in the first
    assert seen["hello_at_bob"]["from"] == "ann" and not seen["hello_at_bob"]["own"]
    assert seen["hello_at_ann"]["own"]
    assert seen["composer_after_send"] == ""

    # Shift+Enter makes a line break, kept and shown as one
    assert seen["multiline_at_bob"]["content"] == "first line\nsecond line"
    assert seen["multiline_at_bob"]["white_space"] == "pre-wrap"
    assert seen["multiline_at_bob"]["height"] > seen["hello_at_bob"]["height"]

    # markup in content is text: the same characters, no element made, nothing run
    assert seen["xss_at_bob"]["content"] == XSS
    assert seen["images_in_list"] == 0

    # a post the server refuses shows the server's reason and keeps what was typed
    assert "control characters" in seen["refused_error"]
    assert seen["refused_kept"]

    # a reload keeps the name and brings the history back
    assert seen["name_after_reload"] == "bob"
    assert seen["status_after_reload"] == "connected"
    assert seen["history_after_reload"][-2:] == [XSS, "héllo ann — long-poll works"]

    # a post whose answers are lost is sent again with the same key, and posted once
    keys = seen["lost_answers_keys"]
    assert len(keys) == 3 and len(set(keys)) == 1 and re.fullmatch(r"[0-9a-f]{32}", keys[0]), keys
    assert seen["lost_answers_in_room"] == seen["lost_answers_at_bob"] == 1
    assert not seen["lost_answers_error_shown"]

    # offline through a burst larger than the history: told exactly how many were lost
    notices = seen["notices_after_missed"]
    assert len(notices) == 1, notices
    missed = int(re.fullmatch(r"(\d+) earlier messages are no longer available", notices[0]).group(1))
    bursts = [content for content in seen["contents_after_missed"] if content.startswith("burst ")]
    assert missed + len(bursts) == MISSED_BURST
    assert bursts[-HISTORY:] == ["burst %d" % n for n in range(MISSED_BURST - HISTORY, MISSED_BURST)]

    # a restarted server (memory lost) makes the page drop its view and start over
    assert seen["status_after_restart"] == "connected"
    assert seen["contents_after_restart"] == ["after the restart"]
    assert len(seen["notices_after_restart"]) == 1
