"""A base revision checked out beside this tree: a temporary git worktree, with the
interpreter to run its server on (this virtualenv when the base's server dependencies are
this tree's, else one made for it). Used by `make regress BASE=` (bench/ab.py) and
`make load BASE=` (loadtests/compare.py).
"""

import os
import shutil
import subprocess
import sys

from harness.processes import ROOT


class Unmeasured(Exception):
    """The A/B run could not be made; the message says why."""


# -- the base checkout ----------------------------------------------------------------------

def git(*args, cwd=ROOT):
    run = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        raise Unmeasured("git %s: %s" % (" ".join(args), (run.stderr or run.stdout).strip()))
    return run.stdout.strip()


class BaseCheckout:
    """The base revision in a temporary git worktree, with the interpreter to run it on."""

    def __init__(self, revision, scratch):
        self.revision = revision
        try:
            self.commit = git("rev-parse", "--verify", "--quiet", revision + "^{commit}")
        except Unmeasured:
            raise Unmeasured("%r is not a commit of this repository" % revision)
        self.root = os.path.join(scratch, "base")
        self.scratch = scratch
        self.python = sys.executable
        self.venv_note = "this virtualenv (same server dependencies)"

    def check_out(self):
        git("worktree", "add", "--detach", self.root, self.commit)
        if server_dependencies(self.root) != server_dependencies(ROOT):
            self.python = make_venv(os.path.join(self.scratch, "venv"), server_dependencies(self.root))
            self.venv_note = "a virtualenv of its own (its server dependencies differ)"

    def remove(self):
        if os.path.exists(self.root):
            subprocess.run(["git", "worktree", "remove", "--force", self.root], cwd=ROOT, capture_output=True,
                           timeout=120)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True, timeout=120)


def copy_of_this_tree(where, root=ROOT):
    """This tree as it is (committed, changed and untracked files, not the ignored ones) at
    `where`, for head's servers to run from: beside the base's worktree, at a path of the
    same length. A server's memory depends on its path: one run from a longer directory
    grew about 30 KiB more while holding polls (4 % at 100 listeners), so a base in a
    temporary directory and head in a checkout differed by that much in A/A runs."""
    listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=root)
    for name in filter(None, listed.split("\0")):
        source = os.path.join(root, name)
        if not os.path.lexists(source):
            continue  # deleted in this tree, not yet committed
        target = os.path.join(where, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    return where


def server_dependencies(root):
    """What the server needs installed: pyproject.toml's [project] dependencies."""
    path = os.path.join(root, "pyproject.toml")
    try:
        import tomllib
    except ImportError:  # Python 3.10: the whole file stands in for its dependency list
        with open(path) as text:
            return text.read()
    with open(path, "rb") as data:
        return sorted(tomllib.load(data).get("project", {}).get("dependencies", []))


def make_venv(where, requirements):
    print("the base needs other server dependencies; making a virtualenv for it", flush=True)
    subprocess.run([sys.executable, "-m", "venv", where], check=True, timeout=300)
    python = os.path.join(where, "bin", "python")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", *requirements], capture_output=True,
                             text=True, timeout=900)
    if install.returncode != 0:
        raise Unmeasured("installing the base's dependencies failed:\n%s" % install.stderr[-2000:])
    return python
