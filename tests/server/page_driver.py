#!/usr/bin/env python3
"""Drive the chat page in headless Chromium as two people and print what was observed, as JSON.

Run as a plain Python process (no gevent): Playwright keeps its own event loop and
threads, and a subprocess gives the test a hard bound on time. The test makes the
assertions; this script only acts and records.

    python tests/server/page_driver.py --url http://127.0.0.1:8080 --chromium /usr/bin/chromium --room e2e \
        --screenshot /tmp/chattle-page.png

With --handshake-dir the script stops after the conversation, writes `ready` there and
waits for `go` (the test restarts the server meanwhile), then checks that the page
reconnects and starts over from the new server's history.
"""

import argparse
import json
import os
import sys
import time
import traceback
import urllib.parse
import urllib.request

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS = "<img src=x onerror=alert(1)>"

CONTENTS_JS = "() => [...document.querySelectorAll('#messages .msg .content')].map(e => e.textContent)"
HAS_CONTENT_JS = ("text => [...document.querySelectorAll('#messages .msg .content')]"
                  ".some(e => e.textContent === text)")
VIEW_JS = ("() => ({status: document.querySelector('#status-text').textContent, "
           "items: [...document.querySelectorAll('#messages li')].map(e => e.textContent.trim())})")
NOTICES_JS = "() => [...document.querySelectorAll('#messages .notice')].map(e => e.textContent.trim())"


def post(url, room, sender, content):
    body = json.dumps({"from": sender, "content": content}).encode()
    request = urllib.request.Request("%s/rooms/%s/msgs" % (url, room), data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def get_messages(url, room):
    with urllib.request.urlopen("%s/rooms/%s/msgs?since=0&timeout=0&limit=1000" % (url, room), timeout=10) as answer:
        return json.loads(answer.read())["messages"]


class Person:
    """One browser context: its own storage, so its own remembered name."""

    def __init__(self, browser, label, observed, wait_ms):
        self.context = browser.new_context(viewport={"width": 900, "height": 640})
        self.page = self.context.new_page()
        self.page.set_default_timeout(wait_ms)
        self.wait_ms = wait_ms
        self.label = label
        self.dialogs = observed.setdefault("dialogs", [])
        self.errors = observed.setdefault("page_errors", [])
        self.page.on("dialog", self._on_dialog)
        self.page.on("pageerror", lambda error: self.errors.append("%s: %s" % (label, error)))
        self.polls = observed.setdefault("polls_" + label, [])
        self.page.on("request", self._on_request)

    def _on_request(self, request):
        path = urllib.parse.urlsplit(request.url)
        if request.method == "GET" and path.path.endswith("/msgs") and len(self.polls) < 5:
            self.polls.append(path.path + ("?" + path.query if path.query else ""))

    def _on_dialog(self, dialog):
        self.dialogs.append("%s: %s %s" % (self.label, dialog.type, dialog.message))
        dialog.dismiss()

    def open(self, url):
        self.page.goto(url, wait_until="domcontentloaded")

    def wait_connected(self):
        self.page.wait_for_selector('#status[data-state="connected"]', timeout=self.wait_ms)
        return self.page.text_content("#status-text")

    def set_name(self, name):
        self.page.fill("#name", name)

    def say(self, *lines):
        """Type a message line by line (Shift+Enter between lines) and send it with Enter."""
        box = self.page.locator("#content")
        box.click()
        for index, line in enumerate(lines):
            if index:
                box.press("Shift+Enter")
            box.press_sequentially(line)
        box.press("Enter")

    def wait_for_content(self, text):
        self.page.wait_for_function(HAS_CONTENT_JS, arg=text, timeout=self.wait_ms)

    def message_with(self, text):
        return self.page.evaluate("""text => {
            const item = [...document.querySelectorAll('#messages .msg')]
                .find(e => e.querySelector('.content').textContent === text);
            return item && {from: item.querySelector('.from').textContent,
                            content: item.querySelector('.content').textContent,
                            own: item.classList.contains('own'),
                            time: item.querySelector('.time').textContent,
                            white_space: getComputedStyle(item.querySelector('.content')).whiteSpace,
                            height: item.querySelector('.content').getBoundingClientRect().height};
        }""", text)


def run(args, observed):
    stage = observed["stage"] = "launch"
    page_url = "%s/rooms/%s" % (args.url, args.room)
    wait_ms = int(args.wait * 1000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            ann = Person(browser, "ann", observed, wait_ms)
            bob = Person(browser, "bob", observed, wait_ms)

            stage = observed["stage"] = "connect"
            ann.open(page_url)
            bob.open(page_url)
            observed["title"] = bob.page.title()
            observed["header_room"] = bob.page.text_content("#room-name")
            observed["status_text"] = [ann.wait_connected(), bob.wait_connected()]

            stage = observed["stage"] = "hello"
            ann.set_name("ann")
            bob.set_name("bob")
            ann.say("hello bob")
            bob.wait_for_content("hello bob")
            observed["hello_at_bob"] = bob.message_with("hello bob")
            ann.wait_for_content("hello bob")
            observed["hello_at_ann"] = ann.message_with("hello bob")
            observed["composer_after_send"] = ann.page.input_value("#content")

            stage = observed["stage"] = "multiline"
            ann.say("first line", "second line")
            bob.wait_for_content("first line\nsecond line")
            observed["multiline_at_bob"] = bob.message_with("first line\nsecond line")

            stage = observed["stage"] = "xss"
            ann.say(XSS)
            bob.wait_for_content(XSS)
            observed["xss_at_bob"] = bob.message_with(XSS)
            observed["images_in_list"] = bob.page.evaluate(
                "() => document.querySelectorAll('#messages img').length")

            stage = observed["stage"] = "reply"
            bob.say("héllo ann — long-poll works")
            ann.wait_for_content("héllo ann — long-poll works")

            stage = observed["stage"] = "refused"
            # A control character passes the page's limits but not the server's checks.
            refused = "bell\u0007 rings"
            bob.page.fill("#content", refused)
            bob.page.press("#content", "Enter")
            bob.page.wait_for_selector("#send-error:not([hidden])", timeout=wait_ms)
            observed["refused_error"] = bob.page.text_content("#send-error")
            observed["refused_kept"] = bob.page.input_value("#content") == refused
            bob.page.fill("#content", "")

            if args.screenshot:
                time.sleep(0.2)  # let the last bubble settle before the picture
                ann.page.screenshot(path=args.screenshot)
                ann.page.emulate_media(color_scheme="dark")
                root, ext = os.path.splitext(args.screenshot)
                ann.page.screenshot(path=root + "-dark" + ext)
                ann.page.emulate_media(color_scheme="light")

            stage = observed["stage"] = "reload"
            bob.page.reload(wait_until="domcontentloaded")
            observed["status_after_reload"] = bob.wait_connected()
            observed["name_after_reload"] = bob.page.input_value("#name")
            bob.wait_for_content(XSS)
            observed["history_after_reload"] = bob.page.evaluate(CONTENTS_JS)

            stage = observed["stage"] = "lost answers"
            # Ann's post reaches the server each time, but the first answer is lost with its
            # connection and the second is a 503 of unknown outcome: the page sends it again
            # with the same key, and it is posted once.
            keys = observed["lost_answers_keys"] = []

            def lose_answers(route):
                if route.request.method != "POST":
                    return route.continue_()
                keys.append(route.request.headers.get("idempotency-key"))
                if len(keys) > 2:
                    return route.continue_()
                route.fetch()
                if len(keys) == 1:
                    return route.abort("connectionreset")
                return route.fulfill(status=503, headers={"Retry-After": "1"},
                                     json={"error": "the answer was lost", "outcome": "unknown"})

            ann.page.route("**/rooms/*/msgs", lose_answers)
            ann.say("said once")
            ann.page.wait_for_function("() => document.querySelector('#content').value === ''", timeout=wait_ms)
            ann.page.unroute("**/rooms/*/msgs", lose_answers)
            bob.wait_for_content("said once")
            observed["lost_answers_at_bob"] = bob.page.evaluate(CONTENTS_JS).count("said once")
            observed["lost_answers_in_room"] = [message["content"] for message in get_messages(args.url, args.room)
                                                ].count("said once")
            observed["lost_answers_error_shown"] = ann.page.is_visible("#send-error")

            stage = observed["stage"] = "missed"
            # Offline long enough that more messages arrive than the server retains.
            bob.context.set_offline(True)
            for number in range(args.missed_burst):
                post(args.url, args.room, "carol", "burst %d" % number)
            bob.context.set_offline(False)
            last_burst = "burst %d" % (args.missed_burst - 1)
            bob.wait_for_content(last_burst)
            bob.wait_connected()
            observed["notices_after_missed"] = bob.page.evaluate(NOTICES_JS)
            observed["contents_after_missed"] = bob.page.evaluate(CONTENTS_JS)

            if args.handshake_dir:
                stage = observed["stage"] = "restart"
                open(os.path.join(args.handshake_dir, "ready"), "w").close()
                go = os.path.join(args.handshake_dir, "go")
                deadline = time.monotonic() + args.wait * 2
                while not os.path.exists(go):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the test never restarted the server")
                    time.sleep(0.05)
                bob.page.wait_for_function(
                    "() => document.querySelector('#messages .notice') !== null && "
                    "document.querySelectorAll('#messages .msg').length === 0", timeout=wait_ms)
                observed["status_after_restart"] = bob.wait_connected()
                post(args.url, args.room, "ann", "after the restart")
                bob.wait_for_content("after the restart")
                observed["notices_after_restart"] = bob.page.evaluate(NOTICES_JS)
                observed["contents_after_restart"] = bob.page.evaluate(CONTENTS_JS)
            stage = observed["stage"] = "done"
        except Exception:
            # what the second person's page showed when a step failed, for the report
            try:
                observed["bob_view"] = bob.page.evaluate(VIEW_JS)
            except Exception:
                pass
            raise
        finally:
            browser.close()
    return stage


def main(argv=None):
    parser = argparse.ArgumentParser(description="Drive the Chattle page as two people in headless Chromium.")
    parser.add_argument("--url", required=True, help="base URL of a running server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--chromium", required=True, help="the browser's executable (Debian's chromium)")
    parser.add_argument("--room", default="e2e", help="room to chat in (default %(default)s)")
    parser.add_argument("--wait", type=float, default=20.0,
                        help="seconds any single wait may take before it fails (default %(default)s)")
    parser.add_argument("--missed-burst", type=int, default=12,
                        help="messages posted while one page is offline; more than the server's "
                             "--history makes it miss some (default %(default)s)")
    parser.add_argument("--screenshot", help="save a PNG of the page there (and a -dark one)")
    parser.add_argument("--handshake-dir", help="directory for the restart handshake with the test")
    args = parser.parse_args(argv)
    observed = {}
    try:
        run(args, observed)
    except Exception:
        observed["error"] = traceback.format_exc()
    print(json.dumps(observed))
    return 0 if "error" not in observed else 1


if __name__ == "__main__":
    sys.exit(main())
