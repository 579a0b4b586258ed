"""Only what pyproject.toml cannot say without warnings: the compiled modules.

loadtests._heldfast is the held polls' common case in C (loadtests/_heldfast.c says why),
loadtests._usercount Locust's count of users by class (loadtests/_usercount.c); `make`'s
editable install builds them in place. Both are optional: without a compiler the load
test still runs, slower, on its Python paths, and its summary says so.
"""

from setuptools import Extension, setup

COMPILE = ["-O2", "-Wall", "-Werror"]

setup(ext_modules=[Extension("loadtests.%s" % name, ["loadtests/%s.c" % name], optional=True,
                             extra_compile_args=COMPILE) for name in ("_heldfast", "_usercount")])
