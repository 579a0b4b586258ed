"""The two sides of a comparison, base and head, as `make regress BASE=` (bench/ab.py) and
`make load BASE=` (loadtests/compare.py) both run them: the base revision checked out into
a temporary git worktree, with the interpreter to run its server on (this virtualenv when
the base's server dependencies are this tree's, else one made for it); head this tree.
Both sides get one hash seed; CHATTLE_BENCH_* variables of the environment and --head-env
reach head's servers only, so the base runs as its product does. The pairs run in turns
(base first, then head first, and so on: `make regress BASE=`) or in a random order drawn
per round (`make load BASE=`). Everything temporary is removed at the end, also on
failure, Ctrl-C or SIGTERM.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile

from harness.processes import ROOT, CleanUp
from instruments.provenance import GitFailed, bench_environment, git, without_bench_environment

# str hashes decide the layout of every dict, and a server's speed moved by up to a tenth
# from one start to the next with random seeds: every process of both sides gets this one.
HASH_SEED = "0"


class Unmeasured(Exception):
    """The A/B run could not be made; the message says why."""


# -- the sides ------------------------------------------------------------------------------

class Side:
    """One side of a comparison: whose server code runs (`root`), on which interpreter, with
    what environment (`env`, the whole of it); `bench_env`: the CHATTLE_BENCH_* settings
    it runs with."""

    def __init__(self, name, root, python, bench_env=None):
        self.name, self.root, self.python = name, root, python
        self.bench_env = dict(bench_env or {})
        self.env = dict(without_bench_environment(), **self.bench_env, PYTHONHASHSEED=HASH_SEED)


def base_and_head(checkout, head_root, head_env):
    """(base, head): the base's worktree on its interpreter, and this tree's code at
    `head_root` on this one, with the environment's CHATTLE_BENCH_* and `head_env` on top."""
    return (Side("base", checkout.root, checkout.python),
            Side("head", head_root, sys.executable, dict(bench_environment(), **head_env)))


def parse_head_env(items):
    """--head-env's NAME=VALUE items as a dict; ValueError names one that is not."""
    env = {}
    for item in items:
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise ValueError("--head-env wants NAME=VALUE, not %r" % item)
        env[name] = value
    return env


def assignments(env):
    """NAME=VALUE ..., sorted: how a side's settings are printed."""
    return " ".join("%s=%s" % item for item in sorted(env.items()))


def in_turn(sides, index):
    """Both sides in the order of pair `index` (from 0): A B, B A, A B, ..., so that whatever
    favours the first or the second run of a pair falls on both sides alike."""
    return tuple(sides) if index % 2 == 0 else tuple(sides)[::-1]


def in_random_order(sides, draw):
    """Both sides in an order drawn from `draw` (a seeded random.Random): a comparison's
    rounds, so that no drift of the machine (a neighbour's job that starts and stops,
    a warming cache) can follow the order and favour one side (Abedi and Brecht's
    randomised multiple interleaved trials)."""
    order = list(sides)
    draw.shuffle(order)
    return tuple(order)


# -- the base checkout ----------------------------------------------------------------------

@contextlib.contextmanager
def scratch_directory(prefix):
    """A temporary directory for the base's worktree and whatever else a comparison keeps
    meanwhile. A SIGTERM takes Ctrl-C's way out of it (CleanUp): it is removed, and every
    worktree git no longer finds is forgotten, on every way out."""
    with CleanUp.armed():
        scratch = tempfile.mkdtemp(prefix=prefix)
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            git("worktree", "prune", check=False)


class BaseCheckout:
    """The base revision in a temporary git worktree, with the interpreter to run it on; as a
    context, the worktree is removed on the way out."""

    def __init__(self, revision, scratch):
        self.revision = revision
        try:
            self.commit = git("rev-parse", "--verify", "--quiet", revision + "^{commit}")
        except GitFailed:
            raise Unmeasured("%r is not a commit of this repository" % revision)
        self.root = os.path.join(scratch, "base")
        self.scratch = scratch
        self.python = sys.executable
        self.venv_note = "this virtualenv (same server dependencies)"

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.remove()

    def check_out(self):
        git("worktree", "add", "--detach", self.root, self.commit)
        if server_dependencies(self.root) != server_dependencies(ROOT):
            self.python = make_venv(os.path.join(self.scratch, "venv"), server_dependencies(self.root))
            self.venv_note = "a virtualenv of its own (its server dependencies differ)"

    def remove(self):
        if os.path.exists(self.root):
            git("worktree", "remove", "--force", self.root, check=False)
        git("worktree", "prune", check=False)


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
