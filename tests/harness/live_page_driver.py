#!/usr/bin/env python3
"""Watch a `make load UI=1` run on Locust's page in headless Chromium, then stop it from the
page, and print what was seen, as JSON. A plain Python process (no gevent), as
tests/server/page_driver.py is, so that the test bounds every browser step by a deadline.

    python tests/harness/live_page_driver.py --url http://127.0.0.1:8089/ --chromium /usr/bin/chromium \
        --held 40 --screenshot /tmp/live.png
"""

import argparse
import json
import sys
import traceback

from playwright.sync_api import sync_playwright

from page_driver import CHROMIUM_ARGS

# {figure: shown value} of the 'Chattle live' table
FIGURES_JS = """() => Object.fromEntries([...document.querySelectorAll('tr')]
    .map(row => [...row.querySelectorAll('td')].map(cell => cell.textContent.trim()))
    .filter(cells => cells.length === 2))"""
HELD = "held polls (the servers' /metrics)"


def run(args, observed):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 760}).new_page()
            page.set_default_timeout(args.wait_ms)
            observed["stage"] = "open"
            page.goto(args.url)
            observed["stage"] = "tab"
            page.get_by_role("tab", name="Chattle live").click()
            observed["stage"] = "live held polls and deliveries"
            # the run's own figures, live: every listener's poll held, and a burst delivered
            page.wait_for_function(
                "([held, wanted]) => { const figures = (%s)(); return figures[held] === String(wanted) "
                "&& Number(figures['deliveries']) > 0; }" % FIGURES_JS, arg=[HELD, args.held],
                timeout=args.live_ms)
            observed["figures"] = page.evaluate(FIGURES_JS)
            page.screenshot(path=args.screenshot)
            observed["stage"] = "stop"
            page.get_by_role("button", name="Stop").click()
            observed["stopped_from_page"] = True
            observed["stage"] = "done"
        finally:
            browser.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--chromium", required=True)
    parser.add_argument("--held", type=int, required=True, help="the held polls the page must show")
    parser.add_argument("--screenshot", required=True)
    parser.add_argument("--wait-ms", type=int, default=20000, help="any one browser step")
    parser.add_argument("--live-ms", type=int, default=90000, help="until the figures are live")
    args = parser.parse_args(argv)
    observed = {"stage": "launch"}
    try:
        run(args, observed)
    except Exception:  # noqa: BLE001  (printed for the test, which fails on it)
        observed["error"] = traceback.format_exc()
    print(json.dumps(observed))
    return 0 if "error" not in observed else 1


if __name__ == "__main__":
    sys.exit(main())
