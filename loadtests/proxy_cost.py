"""What a proxy in front of the server costs: the same figures of a run straight to the
server and of one through the proxy (`make load PROXY=nginx` makes both), side by side.

Per held poll, memory and descriptors are each process group's rise from idle (before
anyone connected) to the sample with the most polls held before the first post, divided
by those polls; CPU per delivery is each group's CPU over the run over the deliveries
(instruments/measures.py, the definitions the rest of the report uses).
"""

from instruments.measures import cpu_per_delivery, memory_per_connection

ROWS = [
    # (key, label, unit, scale): how a figure is shown
    ("wakeup_p50", "wake-up latency p50", "ms", 1000.0),
    ("wakeup_p99", "wake-up latency p99", "ms", 1000.0),
    ("client_lag_p99", "client lag p99", "ms", 1000.0),
    ("server_us_per_delivery", "server CPU per delivery", "us", 1.0),
    ("proxy_us_per_delivery", "nginx CPU per delivery", "us", 1.0),
    ("serving_us_per_delivery", "server + nginx CPU per delivery", "us", 1.0),
    ("client_us_per_delivery", "load generator CPU per delivery", "us", 1.0),
    ("server_bytes_per_held_poll", "server RSS per held poll", "KiB", 1 / 1024.0),
    ("proxy_bytes_per_held_poll", "nginx RSS per held poll", "KiB", 1 / 1024.0),
    ("server_descriptors_per_held_poll", "server descriptors per held poll", "", 1.0),
    ("proxy_descriptors_per_held_poll", "nginx descriptors per held poll", "", 1.0),
]


def per_held_poll(samples, run_info, key, hold_end):
    """`key`'s rise per held poll, from its idle reading to the most polls held before
    `hold_end`; None when the samples do not have it."""
    started = run_info.get("locust_started") or 0
    idle = [row[key] for row in samples if row.get(key) is not None and row["time"] < started]
    holding = [row for row in samples if row.get("held_polls") and row.get(key) is not None and row["time"] < hold_end]
    if not idle or not holding:
        return None
    peak = max(holding, key=lambda row: (row["held_polls"], row["time"]))
    return memory_per_connection(min(idle), peak[key], peak["held_polls"])


def cost_figures(samples, run_info, latency, lag, cpu, deliveries, hold_end):
    """This run's figures of the table, the proxy's None when it had none."""
    proxy_cpu = run_info.get("proxy_cpu_seconds")
    server_cpu = cpu.get("server_cpu_s")
    serving = None if server_cpu is None else server_cpu + (proxy_cpu or 0.0)
    return {"proxy": run_info.get("proxy"), "tls": run_info.get("tls"),
            "wakeup_p50": latency.get("p50"), "wakeup_p99": latency.get("p99"), "client_lag_p99": lag.get("p99"),
            "server_us_per_delivery": cpu.get("server_us_per_delivery"),
            "proxy_us_per_delivery": cpu_per_delivery(proxy_cpu, deliveries) if proxy_cpu is not None else None,
            "serving_us_per_delivery": cpu_per_delivery(serving, deliveries) if serving is not None else None,
            "client_us_per_delivery": cpu.get("client_us_per_delivery"),
            "server_bytes_per_held_poll": per_held_poll(samples, run_info, "server_rss", hold_end),
            "proxy_bytes_per_held_poll": per_held_poll(samples, run_info, "proxy_rss", hold_end),
            "server_descriptors_per_held_poll": per_held_poll(samples, run_info, "server_descriptors", hold_end),
            "proxy_descriptors_per_held_poll": per_held_poll(samples, run_info, "proxy_descriptors", hold_end),
            "deliveries": deliveries}


def shown(value, scale):
    return "-" if value is None else "%.1f" % (value * scale) if value * scale < 100 else "%.0f" % (value * scale)


def table_rows(without, with_proxy):
    """(label, without, with, unit) of every figure."""
    return [(label, shown(without.get(key), scale), shown(with_proxy.get(key), scale), unit)
            for key, label, unit, scale in ROWS]


def lines(without, with_proxy):
    """The table as text, for the terminal."""
    rows = table_rows(without, with_proxy)
    width = max(len(row[0]) for row in rows)
    out = ["%-*s  %12s  %12s" % (width, "the proxy's cost", "without", "with nginx")]
    out += ["%-*s  %12s  %12s  %s" % (width, label, before, after, unit) for label, before, after, unit in rows]
    return out
