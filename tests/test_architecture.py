"""The tree shows the architecture: the product imports nothing from the harness, and each
harness folder imports only from the layers beneath it.

    product        chattle*.py, gunicorn.conf.py
    instruments/   the definitions every measurement shares        (imports: product)
    harness/       starting servers, packages                     (imports: product, instruments)
    bench/, loadtests/  the commands                               (imports: the three above)
    results/       docs/results.md made from the runs' JSON       (imports: all of the above)
    tests/         anything

Read from the source with ast (every import statement, also inside functions, and
__import__ / importlib.import_module of a constant name), so the answer does not depend
on what happens to be imported at run time. What a layer launches obeys the same layers
as what it imports: every `[sys.executable, "-m", "<module>", ...]`, every module given to
(or the default of) a parameter a function puts after "-m", and every `<script>.py` in an
argv list or an os.path.join; a module name built at run time is not seen. And no modules
of the tree import each other in a circle, counting imports inside functions (they only
postpone the circle to run time).
"""

import ast
import os
import re

from instruments.provenance import BENCH_PREFIX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRODUCT_FILES = ["chattle.py", "chattle_rooms.py", "chattle_bus.py", "chattle_redis.py", "chattle_cluster.py",
                 "chattle_http.py", "chattle_request.py", "chattle_limits.py", "chattle_metrics.py", "gunicorn.conf.py"]
PRODUCT = {"chattle", "chattle_rooms", "chattle_bus", "chattle_redis", "chattle_cluster", "chattle_http",
           "chattle_request", "chattle_limits", "chattle_metrics"}
LAYERS = {
    "instruments": PRODUCT,
    "harness": PRODUCT | {"instruments"},
    "bench": PRODUCT | {"instruments", "harness"},
    "loadtests": PRODUCT | {"instruments", "harness"},
    "results": PRODUCT | {"instruments", "harness", "bench", "loadtests"},
}
# Variables that switch on a benchmark's behaviour belong to the harness that wraps the app.
HARNESS_VARIABLE_PREFIX = BENCH_PREFIX


def harness_names():
    """Every top-level name the harness can be imported by: its folders, and the modules
    the tests import from tests/ by name (clients, conftest, ...)."""
    names = {"tests"}
    for entry in os.listdir(ROOT):
        path = os.path.join(ROOT, entry)
        if entry.startswith(".") or not os.path.isdir(path) or entry in ("build", "docs", "views", "static"):
            continue
        if any(name.endswith(".py") for name in os.listdir(path)):
            names.add(entry)
    for _directory, _dirs, files in os.walk(os.path.join(ROOT, "tests")):
        names |= {name[:-3] for name in files if name.endswith(".py")}
    return names


def imported(path):
    """{top-level module name: first line} of everything `path` imports."""
    with open(path, encoding="utf-8") as source:
        tree = ast.parse(source.read(), path)
    found = {}
    for node in ast.walk(tree):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            function = node.func
            name = function.id if isinstance(function, ast.Name) else getattr(function, "attr", "")
            if name in ("__import__", "import_module"):
                modules = [node.args[0].value]
        for module in modules:
            found.setdefault(module.split(".")[0], node.lineno)
    return found


def python_files(folder, root=ROOT):
    for directory, _dirs, files in os.walk(os.path.join(root, folder)):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(directory, name)


# -- what the code launches --------------------------------------------------------------------------

MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


def _argv_strings(node):
    """The string constants of an argv list, tuple or call's arguments, in order (None for
    anything else), and whether they are an os.path.join's."""
    if isinstance(node, (ast.List, ast.Tuple)):
        items = node.elts
    elif isinstance(node, ast.Call):
        items = node.args
    else:
        return None, False
    function = getattr(node, "func", None)
    joined = isinstance(function, ast.Attribute) and function.attr == "join" and \
        isinstance(function.value, ast.Attribute) and function.value.attr == "path"
    return [item.value if isinstance(item, ast.Constant) and isinstance(item.value, str) else None
            for item in items], joined


def _parsed(path):
    with open(path, encoding="utf-8") as source:
        return ast.parse(source.read(), path)


def function_launchers(tree):
    """{name: (position, parameter, default)} of the functions (a class, for its __init__)
    of `tree` that put a parameter after "-m" in an argv list: calling one with a constant
    there launches that module, and so does its default."""
    found = {}
    scopes = [(node, None) for node in tree.body]
    while scopes:
        node, owner = scopes.pop()
        if isinstance(node, ast.ClassDef):
            scopes += [(child, node.name) for child in node.body]
            continue
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        params = [arg.arg for arg in node.args.posonlyargs + node.args.args]
        defaults = dict(zip(params[len(params) - len(node.args.defaults):], node.args.defaults))
        skip = 1 if owner and params[:1] in (["self"], ["cls"]) else 0
        for inner in ast.walk(node):
            if not isinstance(inner, (ast.List, ast.Tuple)):
                continue
            for before, item in zip(inner.elts, inner.elts[1:]):
                if isinstance(before, ast.Constant) and before.value == "-m" and isinstance(item, ast.Name) \
                        and item.id in params:
                    default = defaults.get(item.id)
                    name = owner if owner and node.name == "__init__" else node.name
                    found[name] = (params.index(item.id) - skip, item.id,
                                   default.value if isinstance(default, ast.Constant) else None)
    return found


def launched(path, launchers=None):
    """{(kind, name): first line} of what `path` starts in another process: ("module",
    "<name>") for each "-m" followed by a constant module name in an argv list (or in a
    call's arguments), and for each constant given to (or the default of) a parameter that
    a function puts after "-m" (`launchers`, from function_launchers); ("script",
    "<path>.py") for each constant ending in .py in an argv list or an os.path.join."""
    tree = _parsed(path)
    local = function_launchers(tree)
    launchers = dict(launchers or {}, **local)
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for _name, (_position, parameter, default) in local.items():
                params = [arg.arg for arg in node.args.posonlyargs + node.args.args]
                if parameter in params and default and MODULE_NAME.match(default):
                    found.setdefault(("module", default), node.lineno)
        if isinstance(node, ast.Call):
            function = node.func
            called = function.id if isinstance(function, ast.Name) else getattr(function, "attr", "")
            if called in launchers:
                position, parameter, _default = launchers[called]
                given = [keyword.value for keyword in node.keywords if keyword.arg == parameter]
                if not given and 0 <= position < len(node.args):
                    given = [node.args[position]]
                for value in given:
                    if isinstance(value, ast.Constant) and isinstance(value.value, str) \
                            and MODULE_NAME.match(value.value):
                        found.setdefault(("module", value.value), node.lineno)
        strings, joined = _argv_strings(node)
        if strings is None:
            continue
        for before, value in zip([None] + strings, strings):
            if value is None:
                continue
            if before == "-m" and MODULE_NAME.match(value):
                found.setdefault(("module", value), node.lineno)
            elif value.endswith(".py") and " " not in value and (joined or not isinstance(node, ast.Call)):
                found.setdefault(("script", value), node.lineno)
    return found


def script_layer(script, launcher, root=ROOT):
    """The top-level name a launched script belongs to: its folder (harness/bench_server.py:
    harness), or the module a file of the root is (chattle.py: chattle). A bare name is
    looked for beside the launcher, then at the root, then anywhere if it is unique."""
    parts = script.replace("\\", "/").split("/")
    if len(parts) > 1:
        return parts[0]
    here = os.path.dirname(launcher)
    if os.path.exists(os.path.join(here, script)):
        relative = os.path.relpath(here, root)
        return script[:-3] if relative == "." else relative.split(os.sep)[0]
    if os.path.exists(os.path.join(root, script)):
        return script[:-3]
    owners = {os.path.relpath(directory, root).split(os.sep)[0]
              for directory, _dirs, files in os.walk(root) if script in files and ".venv" not in directory}
    return owners.pop() if len(owners) == 1 else None


# Launches across the layers the tree has today: harness.processes.PeerServer starts the
# reference peer of bench/peers/ by default. This list may only shrink: a launch listed
# here that is gone fails too (remove its line).
KNOWN_LAUNCHES = [
    "harness/processes.py launches bench.peers.aiohttp_chat",
]


def launch_violations(root=ROOT):
    """Every launch by a layer's code of a layer it may not import: ["file:line launches name"]."""
    harness = harness_names() | PRODUCT
    checked = [(name, PRODUCT) for name in PRODUCT_FILES] + \
        [(os.path.relpath(path, root), allowed | {folder})
         for folder, allowed in LAYERS.items() for path in python_files(folder, root)]
    paths = [os.path.join(root, relative) for relative, _allowed in checked]
    launchers = {}
    for path in paths:
        if os.path.exists(path):
            launchers.update(function_launchers(_parsed(path)))
    wrong = []
    for relative, allowed in checked:
        path = os.path.join(root, relative)
        if not os.path.exists(path):
            continue
        for (kind, name), line in sorted(launched(path, launchers).items()):
            layer = name.split(".")[0] if kind == "module" else script_layer(name, path, root)
            if layer in harness and layer not in allowed:
                wrong.append("%s:%d launches %s" % (relative, line, name))
    return wrong


# -- circles ---------------------------------------------------------------------------------------

# A circle of imports hides which module is beneath which: what both need belongs in a
# module beneath them. Circles the tree still has would be listed here, each a set of
# modules that import each other (also through imports inside functions); the list may
# only shrink: a new circle fails, and so does a circle listed here that is gone.
KNOWN_CIRCLES = []


def tree_modules(root=ROOT):
    """{dotted module name: path} of the product and the layered folders."""
    modules = {name[:-3]: os.path.join(root, name) for name in PRODUCT_FILES if name.count(".") == 1}
    for folder in LAYERS:
        for path in python_files(folder, root):
            parts = os.path.relpath(path, root)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def module_imports(path, name, modules):
    """The tree modules `path` (module `name`) imports, anywhere in it: `from a import b`
    counts as a.b when that is a module, else as a."""
    with open(path, encoding="utf-8") as source:
        tree = ast.parse(source.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)] if package else []
                base = ".".join(anchor + ([base] if base else []))
            targets = ["%s.%s" % (base, alias.name) if "%s.%s" % (base, alias.name) in modules else base
                       for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            function = node.func
            called = function.id if isinstance(function, ast.Name) else getattr(function, "attr", "")
            if called in ("__import__", "import_module"):
                targets = [node.args[0].value]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_circles(modules):
    """The strongly connected components of more than one module of the import graph
    (Tarjan's algorithm), each a set of module names."""
    graph = {name: module_imports(path, name, modules) for name, path in modules.items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_product_imports_nothing_from_the_harness():
    harness = harness_names()
    assert {"bench", "loadtests", "harness", "instruments", "clients"} <= harness, harness
    wrong = ["%s:%d imports %s" % (name, line, module)
             for name in PRODUCT_FILES
             for module, line in sorted(imported(os.path.join(ROOT, name)).items()) if module in harness]
    assert not wrong, "the product must not import the harness:\n" + "\n".join(wrong)


def test_the_product_carries_no_benchmark_hook():
    """A slowed server for the gates is the harness's wrapper around the app, not a
    variable the product reads."""
    wrong = []
    for name in PRODUCT_FILES:
        with open(os.path.join(ROOT, name), encoding="utf-8") as source:
            for number, line in enumerate(source, 1):
                if HARNESS_VARIABLE_PREFIX in line:
                    wrong.append("%s:%d: %s" % (name, number, line.strip()))
    assert not wrong, "benchmark hooks in the product:\n" + "\n".join(wrong)


def test_each_harness_folder_imports_only_the_layers_beneath_it():
    harness = harness_names() | PRODUCT
    wrong = []
    for folder, allowed in LAYERS.items():
        for path in python_files(folder):
            for module, line in sorted(imported(path).items()):
                if module in harness and module != folder and module not in allowed:
                    wrong.append("%s:%d imports %s" % (os.path.relpath(path, ROOT), line, module))
    assert not wrong, "\n".join(wrong)


def test_the_import_reader_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "sample.py"
    module.write_text("import os\n\ndef later():\n    from bench.rig import Rig\n    __import__('loadtests')\n")
    assert set(imported(str(module))) == {"os", "bench", "loadtests"}


def test_each_layer_launches_only_what_it_may_import():
    """The product never starts the harness in another process, instruments/ never starts a
    command of bench/ or loadtests/, and so on: `-m <module>` and `<script>.py` obey the
    layers of the imports."""
    found = [re.sub(r":\d+ ", " ", violation) for violation in launch_violations()]
    new = [violation for violation in found if violation not in KNOWN_LAUNCHES]
    gone = [violation for violation in KNOWN_LAUNCHES if violation not in found]
    assert not new, "a layer launches what it may not import:\n" + "\n".join(new)
    assert not gone, "these launches are gone: remove them from KNOWN_LAUNCHES: %s" % gone


def test_the_launch_reader_sees_modules_and_scripts(tmp_path):
    module = tmp_path / "sample.py"
    module.write_text(
        "import os, subprocess, sys\n"
        "HERE = os.path.dirname(__file__)\n"
        "def go(shift):\n"
        "    subprocess.run([sys.executable, '-m', 'loadtests.run', '--users', '3'])\n"
        "    subprocess.Popen(['faketime', '-m', '-f', shift, sys.executable, os.path.join(HERE, 'locustfile.py')])\n"
        "    print('x.py', ['git', 'commit', '-m', 'a message'])\n"
        "    return (sys.executable, 'harness/bench_server.py')\n")
    assert set(launched(str(module))) == {("module", "loadtests.run"), ("script", "locustfile.py"),
                                          ("script", "harness/bench_server.py")}


def test_the_launch_reader_sees_a_module_passed_to_a_launcher(tmp_path):
    """A function or class that puts its parameter after "-m": its default and the
    constants its callers give it are launches."""
    module = tmp_path / "sample.py"
    module.write_text(
        "import sys\n"
        "def python_argv(module, *args):\n"
        "    return [sys.executable, '-m', module, *args]\n"
        "class Server:\n"
        "    def __init__(self, port, module='bench.peers.aiohttp_chat'):\n"
        "        self.argv = [sys.executable, '-m', module, '--port', str(port)]\n"
        "python_argv('loadtests.worker', '--master', 'x')\n"
        "Server(80, module='bench.other')\n"
        "Server(80, 'bench.third')\n")
    assert set(launched(str(module))) == {("module", "bench.peers.aiohttp_chat"), ("module", "loadtests.worker"),
                                          ("module", "bench.other"), ("module", "bench.third")}


def test_the_launch_check_fails_on_a_made_up_violation(tmp_path):
    """A tree whose instruments/ starts `make load` and whose product starts a harness
    script: both are named."""
    for name in PRODUCT_FILES:
        (tmp_path / name).write_text("")
    (tmp_path / "chattle.py").write_text(
        "import os, subprocess, sys\n"
        "subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), 'harness', 'run_server.py')])\n")
    for folder in LAYERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "harness" / "run_server.py").write_text("")
    (tmp_path / "instruments" / "tool.py").write_text(
        "import subprocess, sys\nsubprocess.run([sys.executable, '-m', 'loadtests.run'])\n"
        "subprocess.run([sys.executable, '-m', 'chattle'])\n")
    assert launch_violations(str(tmp_path)) == ["chattle.py:2 launches run_server.py",
                                                "instruments/tool.py:2 launches loadtests.run"]


def test_no_new_import_circle_and_no_stale_known_one():
    """No modules of the tree import each other in a circle, but the KNOWN_CIRCLES of
    today; one of those that is gone must leave the list."""
    circles = import_circles(tree_modules())
    new = [sorted(circle) for circle in circles if circle not in KNOWN_CIRCLES]
    gone = [sorted(circle) for circle in KNOWN_CIRCLES if circle not in circles]
    assert not new, "modules that import each other in a circle: %s" % new
    assert not gone, "these circles are gone: remove them from KNOWN_CIRCLES: %s" % gone


def test_the_circle_finder_finds_a_made_up_circle(tmp_path):
    for folder in LAYERS:
        (tmp_path / folder).mkdir()
    (tmp_path / "bench" / "a.py").write_text("from bench import b\n")
    (tmp_path / "bench" / "b.py").write_text("def later():\n    from bench.c import x\n")
    (tmp_path / "bench" / "c.py").write_text("import bench.a\nimport os\n")
    (tmp_path / "loadtests" / "d.py").write_text("from bench.a import y\n")
    for name in PRODUCT_FILES:
        (tmp_path / name).write_text("")
    assert import_circles(tree_modules(str(tmp_path))) == [{"bench.a", "bench.b", "bench.c"}]

