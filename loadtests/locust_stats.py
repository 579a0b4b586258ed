"""Many untimed requests into Locust's statistics in one call.

A held poll's answers come by the thousand in a fan-out, and Locust's way in, firing
`events.request` once per answer, cost about 4 us each here (the event hook, the stats
handler, two StatsEntry.log calls), more than a tenth of the load generator's whole
cost per delivery. `log_untimed` leaves Locust's statistics exactly as `count` such
fires with no response time would (tests/harness/test_locust_internals.py compares the two
field by field, so a Locust upgrade that changes StatsEntry fails there, loudly).
"""

import time


def log_untimed(stats, method, name, count, content_length, now=None):
    """What `count` calls of stats.log_request(method, name, None, ...) adding up to
    `content_length` bytes leave behind, in one go (all in the current second)."""
    now = time.time() if now is None else now
    second = int(now)
    for entry in (stats.total, stats.get(name, method)):
        if entry.use_response_times_cache and entry.last_request_timestamp and second > int(
                entry.last_request_timestamp):
            entry._cache_response_times(second - 1)
        entry.num_requests += count
        entry.num_none_requests += count
        entry.num_reqs_per_sec[second] += count
        entry.last_request_timestamp = now
        entry.total_content_length += content_length
