"""Every variable the Makefile reads is declared in it (`NAME ?= default`), so the top of
the Makefile and the files it includes list every knob a command takes."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# make's own variables, which no Makefile declares
MAKES_OWN = {"MAKE", "MAKECMDGOALS", "MAKEFLAGS", "MAKEFILE_LIST", "CURDIR", "SHELL", "MAKELEVEL"}
READ = re.compile(r"\$\((?:(?:origin|flavor|value) +)?([A-Z][A-Z0-9_]*)\)")
DECLARED = re.compile(r"^([A-Z][A-Z0-9_]*) *(?:\?|:|::|\+)?=", re.M)
INCLUDE = re.compile(r"^-?include +(\S+) *$", re.M)


def makefile_text(path="Makefile"):
    """The Makefile and, after it, every file it includes."""
    with open(os.path.join(ROOT, path)) as makefile:
        text = makefile.read()
    return text + "".join(makefile_text(included) for included in INCLUDE.findall(text))


def undeclared(text):
    """{variable: first line reading it} of the variables `text` reads but never declares."""
    declared = set(DECLARED.findall(text)) | MAKES_OWN
    found = {}
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        for name in READ.findall(line):
            if name not in declared:
                found.setdefault(name, number)
    return found


def test_every_variable_read_is_declared():
    missing = undeclared(makefile_text())
    assert not missing, "read but never declared (add `NAME ?=` with its default): " + ", ".join(
        "%s (line %d)" % item for item in sorted(missing.items()))


def test_the_reader_finds_reads_in_recipes_and_conditions():
    text = ("A ?= 1\nB := $(A)\nrun:\n\tcmd $(if $(C),--c $(C)) $(A) $(MAKECMDGOALS)\n"
            "X = $(if $(filter command line,$(origin D)),--d)\n# $(E) in a comment\n")
    assert undeclared(text) == {"C": 4, "D": 5}
