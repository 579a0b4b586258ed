"""Writing a report directory: reports/<timestamp>/ with report.html, PNG charts and
their captions, and the reports/latest link. Shared by `make load` and `make bench`.
"""

import datetime
import html
import json
import os
import platform
import sys

# Output only: made on the first run, ignored by git.
REPORTS_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reports")


def new_report_dir(kind, root=REPORTS_ROOT):
    """reports/<timestamp>-<kind>/, and reports/latest pointing at it."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(root, "%s-%s" % (stamp, kind))
    suffix = 1
    while os.path.exists(path):
        suffix += 1
        path = os.path.join(root, "%s-%s-%d" % (stamp, kind, suffix))
    os.makedirs(path)
    latest = os.path.join(root, "latest")
    try:
        if os.path.islink(latest) or os.path.exists(latest):
            os.remove(latest)
        os.symlink(os.path.basename(path), latest)
    except OSError:
        pass  # a filesystem without symlinks still gets the report itself
    return path


def machine_description():
    """What a caption names as 'on what machine': cores, memory, OS, versions."""
    info = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
    }
    try:
        import psutil
        info["memory_gib"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
    except ImportError:
        pass
    # The installed versions, read from the packages' metadata: importing locust to ask would
    # monkey-patch the asking process (an orchestrator's waits then hung until their timeouts).
    from importlib import metadata

    for module in ("gevent", "bottle", "gunicorn", "locust", "redis"):
        try:
            info[module] = metadata.version(module)
        except metadata.PackageNotFoundError:
            pass
    return info


def machine_line(info=None):
    info = info or machine_description()
    parts = ["%s cores" % info.get("cores")]
    if "memory_gib" in info:
        parts.append("%s GiB" % info["memory_gib"])
    parts.append("%s %s" % (info.get("platform"), info.get("machine")))
    parts.append("Python %s" % info.get("python"))
    for module in ("gevent", "bottle", "gunicorn", "locust"):
        if module in info:
            parts.append("%s %s" % (module, info[module]))
    return ", ".join(parts)


def print_results_entry(section, argv, description):
    """The main() of a module that makes a docs/results.md entry: prints the lines
    `section` makes of the run's kept JSON (the path argv names) and returns 0."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("record", help="the run's JSON, kept in docs/runs/")
    args = parser.parse_args(argv)
    with open(args.record) as kept:
        print("\n".join(section(json.load(kept))))
    return 0


def write_json(path, data):
    with open(path, "w") as out:
        json.dump(data, out, indent=2, sort_keys=True, default=str)
        out.write("\n")


def print_entry(path, section):
    """A docs/results.md entry: the lines `section` makes of the run's JSON kept at `path`."""
    with open(path) as source:
        print("\n".join(section(json.load(source))))
    return 0


_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #1d2330; }
h1 { font-size: 1.6em; margin-bottom: .2em; } .sub { color: #5b6475; margin-top: 0; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { padding: .25em .8em; border-bottom: 1px solid #e3e6ec; text-align: left; }
th { background: #f4f6f9; } .fail { color: #b3261e; font-weight: 600; } .pass { color: #1b7f3b; font-weight: 600; }
figure { margin: 2em 0; } figure img { max-width: 100%; border: 1px solid #e3e6ec; border-radius: 6px; }
figcaption { color: #39414f; margin-top: .4em; } .note { background: #fff7e0; padding: .6em 1em; border-radius: 6px; }
"""


def write_html(path, title, subtitle, headline_rows, charts, notes=(), links=(), tables=()):
    """report.html: a headline table, then each chart with the caption that explains it.

    headline_rows: [(label, value, css_class or "")]; charts: [(png file name, caption)];
    notes: paragraphs shown highlighted above the charts; links: [(href, text)];
    tables: [(title, header cells, rows of cells)] shown after the headline table.
    """
    esc = html.escape
    out = ["<!doctype html><html lang=en><meta charset=utf-8><title>%s</title><style>%s</style>"
           % (esc(title), _STYLE), "<h1>%s</h1><p class=sub>%s</p>" % (esc(title), esc(subtitle))]
    for note in notes:
        out.append("<p class=note>%s</p>" % esc(note))
    out.append("<table>")
    for label, value, css in headline_rows:
        out.append("<tr><th>%s</th><td class='%s'>%s</td></tr>" % (esc(label), esc(css or ""), esc(str(value))))
    out.append("</table>")
    for title_text, header, rows in tables:
        out.append("<h2>%s</h2><table><tr>%s</tr>" % (esc(title_text), "".join("<th>%s</th>" % esc(str(cell))
                                                                            for cell in header)))
        out += ["<tr>%s</tr>" % "".join("<td>%s</td>" % esc(str(cell)) for cell in row) for row in rows]
        out.append("</table>")
    for png, caption in charts:
        out.append("<figure><img src='%s' alt='%s'><figcaption>%s</figcaption></figure>"
                   % (esc(png), esc(caption[:120]), esc(caption)))
    if links:
        out.append("<p>" + " &middot; ".join("<a href='%s'>%s</a>" % (esc(href), esc(text))
                                              for href, text in links) + "</p>")
    out.append("<p class=sub>Generated %s by %s</p></html>"
               % (datetime.datetime.now().isoformat(timespec="seconds"), esc(" ".join(sys.argv[:1]))))
    with open(path, "w") as page:
        page.write("\n".join(out))
