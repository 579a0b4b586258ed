"""Only what pyproject.toml cannot say without warnings: the compiled module.

loadtests._heldfast is the held polls' common case in C (loadtests/_heldfast.c says why);
`make`'s editable install builds it in place. It is optional: without a compiler the load
test still runs, slower, on its Python path, and its summary says so. Warnings are shown,
not made errors: with optional=True an error would silently drop to the slow path.
"""

from setuptools import Extension, setup

COMPILE = ["-O2", "-Wall", "-Wextra", "-Wshadow"]

setup(ext_modules=[Extension("loadtests._heldfast", ["loadtests/_heldfast.c"], optional=True,
                             extra_compile_args=COMPILE)])
