"""The tree shows the architecture: the product imports nothing from the harness, and each
harness folder imports only from the layers beneath it.

    product        chattle*.py, gunicorn.conf.py
    instruments/   the definitions every measurement shares        (imports: product)
    harness/       starting servers, packages, the cluster demo   (imports: product, instruments)
    bench/, loadtests/  the commands                               (imports: the three above)
    tests/         anything

Read from the source with ast (every import statement, also inside functions, and
__import__ / importlib.import_module of a constant name), so the answer does not depend
on what happens to be imported at run time.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRODUCT_FILES = ["chattle.py", "chattle_rooms.py", "chattle_bus.py", "chattle_redis.py", "chattle_cluster.py",
                 "chattle_http.py", "chattle_request.py", "chattle_limits.py", "gunicorn.conf.py"]
PRODUCT = {"chattle", "chattle_rooms", "chattle_bus", "chattle_redis", "chattle_cluster", "chattle_http",
           "chattle_request", "chattle_limits"}
LAYERS = {
    "instruments": PRODUCT,
    "harness": PRODUCT | {"instruments"},
    "bench": PRODUCT | {"instruments", "harness"},
    "loadtests": PRODUCT | {"instruments", "harness"},
}
# Variables that switch on a benchmark's behaviour belong to the harness that wraps the app.
HARNESS_VARIABLE_PREFIX = "CHATTLE_BENCH_"


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
    names |= {name[:-3] for name in os.listdir(os.path.join(ROOT, "tests")) if name.endswith(".py")}
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


def python_files(folder):
    for directory, _dirs, files in os.walk(os.path.join(ROOT, folder)):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(directory, name)


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
