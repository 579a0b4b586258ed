"""The documentation shows only what exists: every `make <target>` in README.md and
docs/*.md is a target of the Makefile (and every VARIABLE= it sets is one the Makefile
reads), every `python -m <module>` and `python <script>.py` it names answers --help,
and every relative link reaches its file and, for #anchors, a heading there.

Targets come from make's own database (`make -qp`: question mode runs no recipe, so no
system-packages check and no venv build), not from `make -n <target>`, which still
expands and runs what a target's prerequisites need.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))
                              if name.endswith(".md"))
HELP_DEADLINE = 120  # seconds for one --help: imports only, but on a shared, loaded machine

FENCED = re.compile(r"^```.*?^```", re.M | re.S)
INDENTED = re.compile(r"(?:^(?: {4}|\t).*\n?)+", re.M)
INLINE = re.compile(r"`([^`\n]+)`")
# A make command starts a line of code (after any indentation or a shell prompt), so
# prose that happens to sit in an indented list item is not taken for one.
MAKE_COMMAND = re.compile(r"^[ \t]*(?:\$ )?make ([a-z][\w-]*)((?: +[A-Z][A-Z0-9_]*=\S*)*)", re.M)
PYTHON_MODULE = re.compile(r"python -m ([A-Za-z_][\w.]*)")
PYTHON_SCRIPT = re.compile(r"python ([\w/]+\.py)\b")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.M)


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def code_of(text):
    """The code a page shows: fenced blocks, indented blocks and inline code spans."""
    blocks = FENCED.findall(text)
    prose = FENCED.sub("", text)
    blocks += INDENTED.findall(prose)
    blocks += INLINE.findall(INDENTED.sub("", prose))
    return "\n".join(blocks)


def shown(pattern):
    """(page, match) for every match of `pattern` in the code of every page."""
    return [(page, match) for page in DOCS for match in pattern.finditer(code_of(read(page)))]


def make_targets():
    """Every explicit target in make's database of this Makefile."""
    run = subprocess.run(["make", "-qp", "-f", "Makefile", "-C", ROOT, "--no-print-directory",
                          "chattle-docs-no-such-target"], capture_output=True, text=True,
                         timeout=HELP_DEADLINE, env=dict(os.environ, MAKEFLAGS=""))
    targets, not_a_target = set(), False
    for line in run.stdout.splitlines():
        if line.startswith("# Not a target"):
            not_a_target = True
            continue
        match = re.match(r"^([A-Za-z0-9][\w.-]*):(?!=)", line)
        if match and not not_a_target:
            targets.add(match.group(1))
        not_a_target = False
    assert "test" in targets, "make -qp listed no targets:\n" + run.stdout[-2000:] + run.stderr
    return targets


def makefile_text():
    """The Makefile and the files it includes (loadtests/options.mk: make load's variables)."""
    text = read("Makefile")
    return text + "".join(read(path) for path in re.findall(r"^include +(\S+)$", text, re.M))


def test_every_make_command_shown_is_a_target_with_its_variables():
    targets = make_targets()
    makefile = makefile_text()
    commands = shown(MAKE_COMMAND)
    assert commands, "no `make <target>` found in the docs: is the pattern wrong?"
    wrong = []
    for page, match in commands:
        target, assignments = match.group(1), match.group(2).split()
        if target not in targets:
            wrong.append("%s: `make %s` is not a target of the Makefile" % (page, target))
        for assignment in assignments:
            variable = assignment.split("=", 1)[0]
            if "$(%s)" % variable not in makefile:
                wrong.append("%s: `%s` sets %s, which the Makefile never reads" % (page, match.group(0), variable))
    assert not wrong, "\n".join(sorted(set(wrong)))


def help_commands():
    """Each module and script the docs run with python, once, as an argv for --help."""
    commands = {}
    for _page, match in shown(PYTHON_MODULE):
        commands.setdefault(match.group(1), ["-m", match.group(1)])
    for _page, match in shown(PYTHON_SCRIPT):
        commands.setdefault(match.group(1), [match.group(1)])
    return sorted(commands.items())


HELP_COMMANDS = help_commands()


def test_the_docs_name_python_commands():
    names = [name for name, _argv in HELP_COMMANDS]
    assert "loadtests.run" in names and "chattle.py" in names, names


@pytest.mark.parametrize("name,argv", HELP_COMMANDS, ids=[name for name, _argv in HELP_COMMANDS])
def test_every_python_command_shown_answers_help(name, argv):
    run = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=HELP_DEADLINE)
    assert run.returncode == 0 and "usage" in run.stdout.lower(), (
        "`python %s --help` failed (exit %d):\n%s%s" % (" ".join(argv), run.returncode, run.stdout, run.stderr))


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to
    hyphens (`make_load` keeps its underscore)."""
    text = re.sub(r"[`*]|<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    seen, found = {}, set()
    for heading in HEADING.findall(FENCED.sub("", read(path))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else "%s-%d" % (base, count))
    return found


def test_slugs_are_githubs():
    assert slug("Many workers: the shared Redis bus") == "many-workers-the-shared-redis-bus"
    assert slug("What `make load` prints") == "what-make-load-prints"
    assert slug("gunicorn's own gevent worker") == "gunicorns-own-gevent-worker"
    assert slug("Wake-up latency: make bench REDIS_CLUSTER=") == "wake-up-latency-make-bench-redis_cluster"


def test_every_relative_link_resolves():
    broken = []
    for page in DOCS:
        text = FENCED.sub("", read(page))
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _hash, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(os.path.join(ROOT, resolved)):
                broken.append("%s: %s (no file %s)" % (page, target, resolved))
            elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
                broken.append("%s: %s (no heading with anchor #%s in %s)" % (page, target, anchor, resolved))
    assert not broken, "\n".join(broken)


def table_rows(text, first_header):
    """The cells of each row of the table whose first column is headed `first_header`."""
    rows, inside = [], False
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            inside = True
        elif inside and line.startswith("|"):
            if not set(cells[0]) <= set("- "):
                rows.append(cells)
        else:
            inside = False
    return rows


def test_the_settings_table_is_the_servers():
    """deploy.md's settings table names every flag of `python chattle.py`, its variable
    and its default."""
    import chattle

    documented = {row[0].strip("`"): row for row in table_rows(read("docs/deploy.md"), "flag")}
    wrong = []
    for name, env, _kind, default, _help in chattle.SETTINGS:
        flag = "--" + name.replace("_", "-")
        row = documented.pop(flag, None)
        if row is None:
            wrong.append("%s is not in docs/deploy.md's settings table" % flag)
            continue
        if row[1].strip("`") != env:
            wrong.append("%s: the table says %s, the server reads %s" % (flag, row[1], env))
        shown_default = row[2].split(" (")[0]
        if shown_default != ("(empty)" if default == "" else "%g" % default if isinstance(default, float)
                             else str(default)):
            wrong.append("%s: the table's default is %s, the server's %r" % (flag, row[2], default))
    wrong += ["%s is in the table but not a flag of chattle.py" % flag for flag in documented]
    assert not wrong, "\n".join(wrong)


def documented_default(text):
    """A default as the knobs table writes it ("20 s", "500/s", "0 (auto)", "(none)") as a string
    to compare with the flag's."""
    text = text.strip("`").split(" (")[0]
    if text in ("", "(none)"):
        return ""
    return re.sub(r"(?<=\d)(?: s|/s)$", "", text)


def same_default(shown, actual):
    if actual is None:  # the flag passes nothing unless given: the table shows "(none)"
        return shown == ""
    if isinstance(actual, (int, float)) and not isinstance(actual, bool):
        try:
            return float(shown) == float(actual)
        except ValueError:
            return False
    return shown == actual or (shown.endswith("/") and os.path.basename(str(actual)) == shown.strip("/"))


def test_the_make_load_knobs_table_is_the_options_table():
    """docs/measuring.md's knobs are loadtests/options.py's: each row's variable is its flag's
    (the Makefile passes it through loadtests/options.mk), each default the table's, and
    every option make passes has its row."""
    from loadtests import options

    rows = table_rows(read("docs/measuring.md"), "variable")
    assert len(rows) > 10, rows
    wrong, seen = [], set()
    for variables, flags, shown_defaults, _meaning in rows:
        variables = [name.strip("`=") for name in variables.split(", ") if name]
        flags = [name.strip("`") for name in flags.split(", ")]
        shown = [documented_default(value) for value in shown_defaults.split(", ")]
        if not len(shown) == len(flags) == len(variables):
            wrong.append("%s: %d variables and %d defaults for %d flags" % (flags, len(variables), len(shown),
                                                                            len(flags)))
            continue
        for variable, flag, value in zip(variables, flags, shown):
            option = options.BY_NAME.get(flag[2:])
            if option is None or option.flag != flag:
                wrong.append("%s is not an option of loadtests/options.py" % flag)
                continue
            seen.add(option.name)
            if variable != option.variable:
                wrong.append("%s: the table says %s=, make passes it as %s=" % (flag, variable, option.variable))
            if not same_default(value, option.default if option.kind != options.SWITCH else None):
                wrong.append("%s: the table's default is %r, the option's %r" % (flag, value, option.default))
    wrong += ["%s= (%s) has no row in docs/measuring.md's knobs" % (option.variable, option.flag)
              for option in options.OPTIONS if option.variable and option.name not in seen]
    assert not wrong, "\n".join(wrong)


# A commit as pages name one: an abbreviated or whole hash standing alone (not inside a
# quoted JSON value, a path or an anchor), with both letters and digits so plain numbers
# and words are not taken for one.
COMMIT = re.compile(r'(?<![\w"/.#-])([0-9a-f]{7,40})(?![\w"/-]|\.\w)')


def named_commits(text):
    return sorted({match for match in COMMIT.findall(text) if re.search("[a-f]", match) and re.search("[0-9]", match)})


def test_every_commit_a_page_names_is_in_the_history():
    """A figure's provenance is its commit: one that is not in this repository's history
    (a scratch branch, a typo) cannot be checked out to run it again."""
    missing = []
    for page in DOCS:
        for commit in named_commits(read(page)):
            found = subprocess.run(["git", "-C", ROOT, "cat-file", "-e", commit + "^{commit}"],
                                   capture_output=True, timeout=HELP_DEADLINE)
            if found.returncode != 0:
                missing.append("%s names commit %s, which is not in this repository's history" % (page, commit))
    assert not missing, "\n".join(missing)


def test_a_made_up_commit_is_found_and_json_values_are_not_commits():
    assert named_commits("measured at commit 7a91a01 (and 0123abc), 2026-12-07") == ["0123abc", "7a91a01"]
    assert named_commits("Measured at commit 1234abc.\nAt commit 5678def: more.") == ["1234abc", "5678def"]
    assert named_commits('{"epoch": "6621361f3c9a2"}, reports/20261204-170128-load, #a1b2c3d4') == []


# A measured figure: a number with a unit of measurement (time in ms, us or µs, minutes;
# memory in KiB, MiB, GiB, KB, MB, GB; a percentage; a rate per second) in a page's prose,
# outside code. Figures are measurements and live in docs/results.md, with their command,
# date, commit and machine; any other page states one only in a paragraph (or table row)
# that links to results.md. Not measurements, and so not checked:
# - a figure right after a word that makes it a setting, a limit or a threshold
#   ("default 25 s", "at most 25 %", "over 0.50", "up to about 8 KB", "gated at +3 %",
#   "reached 95 %", "per 50 ms tick"): NOT_A_MEASUREMENT;
# - a figure named as a setting's value: right after a setting in code ("`--x` (256 KiB)"),
#   or followed by one or by "by default" ("1 KiB (`READ_BUFFER_BYTES`)", "1000 ms by
#   default"), and the confidence level of an interval ("a 95 % interval");
# - the rows of the tables of settings, limits, thresholds and injected faults, whose
#   values are settings (SETTINGS_TABLES, by the header of their first column, and tables
#   with a column headed as in SETTINGS_COLUMNS).
UNIT = r"(?:ms|us|µs|min|minutes?|KiB|MiB|GiB|KB|MB|GB|%|(?:polls?|posts?|messages?|requests?|deliveries)?/s)"
FIGURE = re.compile(r"(?<![\w.#/-])(\d[\d,.]*(?: \d{3})*)(?: ?)(" + UNIT + r")(?![\w/])")
NOT_A_MEASUREMENT = re.compile(
    r"(?:\bdefaults?(?: is| of| to)?|\bat most|\bat least|\babove|\bover|\bunder|\bbelow|\bwithin|\bup to|"
    r"\bmore than|\bless than|\blimit(?:ed)?(?: of| to)?|\bobjective(?: of)?|\bgated?(?: at| of)?|"
    r"\bgate is|\bmargin(?: of)?|\bthreshold(?: of)?|\bfloor(?: of)?|\btimeout(?: of)?|\bevery|\bper|"
    r"\bpast|\breach(?:es|ed)?|\bexceeds?|\bbudget(?: of)?|\bcap(?:ped)?(?: at| of)?|[<>≤≥=]|\bto|\bfrom|-|"
    r"`code` \()\s*(?:about\s+|the\s+)?[*+~(]*$", re.I)
A_SETTING_AFTER = re.compile(r"^\s*(?:\(`|by default|(?:confidence\s+|bootstrap\s+)?interval)")
SETTINGS_TABLES = ("flag", "variable", "setting", "limit", "knob", "fault")
SETTINGS_COLUMNS = {"default", "threshold", "gate"}  # or a table with such a column
RESULTS_LINK = re.compile(r"\]\((?:\.\./)?(?:docs/)?results\.md(?:#[^)]*)?\)")


def prose_paragraphs(text):
    """A page's paragraphs (table rows each on their own), code taken out: (first line number, text)."""
    text = FENCED.sub(lambda match: "\n" * match.group(0).count("\n"), text)
    text = INDENTED.sub(lambda match: "\n" * match.group(0).count("\n"), text)
    paragraphs, current, start, table_header = [], [], 0, None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("|"):
            if current:
                paragraphs.append((start, "\n".join(current)))
                current = []
            cells = [cell.strip().lower() for cell in line.strip().strip("|").split("|")]
            if table_header is None:
                table_header = cells[0] if not SETTINGS_COLUMNS & set(cells) else SETTINGS_TABLES[0]
            elif not set(cells[0]) <= set("-: ") and table_header not in SETTINGS_TABLES:
                paragraphs.append((number, line))
            continue
        table_header = None
        if not line.strip() or line.startswith("#"):
            if current:
                paragraphs.append((start, "\n".join(current)))
            current = []
            continue
        if not current:
            start = number
        current.append(line)
    if current:
        paragraphs.append((start, "\n".join(current)))
    return paragraphs


def measured_figures(text):
    """(line, figure) for every measured figure in prose not linked to results.md."""
    found = []
    for start, paragraph in prose_paragraphs(text):
        if RESULTS_LINK.search(paragraph):
            continue
        prose = INLINE.sub("`code`", paragraph)
        for match in FIGURE.finditer(prose):
            if (NOT_A_MEASUREMENT.search(prose[max(0, match.start() - 40):match.start()])
                    or A_SETTING_AFTER.match(prose[match.end():match.end() + 40])):
                continue
            found.append((start + prose.count("\n", 0, match.start()), match.group(0)))
    return found


def test_a_measured_figure_outside_results_md_links_to_it():
    wrong = ["%s:%d: %s" % (page, line, figure) for page in DOCS if page != "docs/results.md"
             for line, figure in measured_figures(read(page))]
    assert not wrong, ("measured figures that do not link to docs/results.md (move the figure there, "
                       "with its command, date, commit and machine, and link to it):\n" + "\n".join(wrong))


def test_what_counts_as_a_measured_figure():
    assert measured_figures("Memory per held poll is 9.0 KiB, wake-up p99 660 ms.\n") == [(1, "9.0 KiB"), (1, "660 ms")]
    assert measured_figures("It took 10 min 13 s and used 43 % of a core.\n") == [(1, "10 min"), (1, "43 %")]
    assert measured_figures("p99 660 ms ([results](results.md#a-default-make-load)).\n") == []
    assert measured_figures("The poll is held (default 25 s), at most 500 ms, over 10 %.\n") == []
    assert measured_figures("`--max-answer-bytes` (256 KiB); past 1 KiB (`READ_BUFFER_BYTES`); 1000 ms by default; "
                            "a 95 % interval; gated at **+3 %**; up to about 8 KB.\n") == []
    assert measured_figures("Run `make load` for `8 KiB`:\n\n    took 12 ms\n") == []
    assert measured_figures("| flag | default |\n| --- | --- |\n| `--x` | 64 KiB |\n") == []
    assert measured_figures("| run | p99 |\n| --- | --- |\n| one | 12 ms |\n") == [(3, "12 ms")]
    assert measured_figures("| figure | threshold |\n| --- | --- |\n| p99 | 10 % |\n") == []


def generated_blocks():
    from results.make import blocks

    return blocks(read("docs/results.md"))


def any_kept(paths):
    return not paths or any(os.path.exists(os.path.join(ROOT, path)) for path in paths)


def test_every_generated_block_of_results_md_is_what_its_command_prints():
    """A block of docs/results.md is what `python -m <module> docs/runs/<file>.json` prints:
    a figure edited by hand, or a new run whose JSON was not kept, parts them."""
    from results.make import render

    found = generated_blocks()
    assert len(found) >= 2, "docs/results.md has no generated blocks: is the marker pattern wrong?"
    stale = ["python -m %s %s" % (module, " ".join(paths)) for module, paths, body in found
             if (render(module, paths, ROOT).rstrip("\n") + "\n" if any_kept(paths) else "") != body]
    assert not stale, ("blocks of docs/results.md that are not what their command prints (run `make results`, "
                       "or keep the run's JSON in docs/runs/):\n" + "\n".join(stale))


def test_every_kept_run_is_rendered_in_results_md():
    from results.make import unrendered_runs

    missing = unrendered_runs(read("docs/results.md"), ROOT)
    assert not missing, "runs kept in docs/runs/ that no block of docs/results.md renders: %s" % missing


def test_results_md_states_no_figure_outside_its_blocks():
    """Prose beside a block may explain its figures; a figure it states is one of the blocks'."""
    from results.make import BLOCK

    text = read("docs/results.md")
    made = " ".join(match.group(0) for match in BLOCK.finditer(text))
    outside = BLOCK.sub("", text)
    stray = ["docs/results.md:%d: %s" % (line, figure) for line, figure in measured_figures(outside)
             if figure not in made]
    assert not stray, "figures in docs/results.md's prose that no generated block states:\n" + "\n".join(stray)
