"""Rewrite every generated block of docs/results.md in place from its run's JSON
(`make results`); --check only says which blocks differ (exit 1).

A block is `<!-- made by: python -m <module> <docs/runs/...json ...> -->`, what that command
prints, then `<!-- end -->` (the convention: results/__init__.py). The module's main(argv) is
called in this process with the paths, its output captured. A block none of whose runs is
kept yet is empty (make test's, until CI's timing is written): the run's JSON fills it.
"""

import argparse
import contextlib
import glob
import importlib
import io
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "results.md")
BLOCK = re.compile(r"^(<!-- made by: python -m ([\w.]+)((?: docs/runs/[\w.-]+\.json)*) -->\n)(.*?)^(<!-- end -->)$",
                   re.M | re.S)


class RenderFailed(RuntimeError):
    """A block's command did not print its block; the message says which and why."""


def render(module, paths, root=ROOT):
    """What `python -m <module> <paths>` prints, run in this process from `root`."""
    out = io.StringIO()
    here = os.getcwd()
    try:
        os.chdir(root)
        with contextlib.redirect_stdout(out):
            code = importlib.import_module(module).main(list(paths))
    except SystemExit as exc:
        code = exc.code
    except Exception as exc:  # noqa: BLE001  (any renderer's failure is one line naming the block)
        raise RenderFailed("python -m %s %s: %s: %s" % (module, " ".join(paths), type(exc).__name__, exc))
    finally:
        os.chdir(here)
    if code:
        raise RenderFailed("python -m %s %s exited %s" % (module, " ".join(paths), code))
    return out.getvalue()


def blocks(text):
    """(module, [paths], the block's current text) of every generated block in `text`."""
    return [(match.group(2), match.group(3).split(), match.group(4)) for match in BLOCK.finditer(text)]


def regenerate(text, root=ROOT):
    """`text` with every block's body replaced by what its command prints now."""
    def made(match):
        paths = match.group(3).split()
        if paths and not any(os.path.exists(os.path.join(root, path)) for path in paths):
            return match.group(1) + match.group(5)  # not run yet: an empty block, which the run's JSON fills
        body = render(match.group(2), paths, root)
        return match.group(1) + body.rstrip("\n") + "\n" + match.group(5)
    return BLOCK.sub(made, text)


def rendered_runs(text):
    """Every docs/runs/ path some block of `text` renders."""
    return {path for _module, paths, _body in blocks(text) for path in paths}


def unrendered_runs(text, root=ROOT):
    """The files in docs/runs/ that no block of `text` renders."""
    kept = {os.path.relpath(path, root) for path in glob.glob(os.path.join(root, "docs", "runs", "*.json"))}
    return sorted(kept - rendered_runs(text))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 if a block differs")
    parser.add_argument("--page", default=PAGE, help="the page, in a docs/ folder (default docs/results.md)")
    args = parser.parse_args(argv)
    with open(args.page, encoding="utf-8") as source:
        text = source.read()
    root = os.path.dirname(os.path.dirname(os.path.abspath(args.page)))  # the paths in blocks are from here
    try:
        made = regenerate(text, root)
    except RenderFailed as exc:
        print("results: %s" % exc, file=sys.stderr)
        return 2
    missing = unrendered_runs(made, root)
    for path in missing:
        print("results: %s is rendered by no block of %s" % (path, args.page),
              file=sys.stderr)
    if args.check:
        stale = [module + " " + " ".join(paths) for (module, paths, body), (_m, _p, new)
                 in zip(blocks(text), blocks(made)) if body != new]
        for block in stale:
            print("results: the block made by `python -m %s` is not what it prints" % block, file=sys.stderr)
        return 1 if stale or missing else 0
    if made != text:
        with open(args.page, "w", encoding="utf-8") as out:
            out.write(made)
    print("results: %d blocks of %s made from docs/runs/" % (len(blocks(made)), args.page))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
