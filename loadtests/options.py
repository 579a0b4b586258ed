"""`make load`'s options, each declared once: its name, type, default and help, and where
it goes. `python -m loadtests.run`'s flags, the locustfile's Locust options, the
comparison's flags (`make load BASE=`) and the Makefile's variables are all made here:

    make load NAME=value  ->  python -m loadtests.run --name value  ->  locust --name value

The Makefile variable is the name upper-cased, - as _ (`--burst-size`, BURST_SIZE=); it
reads them from loadtests/options.mk, which this module writes:

    python -m loadtests.options --makefile > loadtests/options.mk

(tests/harness/test_load_options.py fails when the file is not what this table makes). An option
whose name Locust already uses for one of its own (`--users`, `--spawn-rate`) keeps the
name everywhere but on Locust's command line, where it is `--chattle-<name>`.
"""

import argparse
import sys

from harness.processes import LOOPBACK, ROOT
from instruments.page import REPORTS_ROOT

# Where an option is declared: RUN, python -m loadtests.run; LOCUST, the locustfile (run.py
# passes it on); COMPARE, loadtests/compare.py (make load BASE=; run.py lists it in --help).
RUN, LOCUST, COMPARE = "run", "locust", "compare"
# Locust's own options that a name here would clash with (tests/harness/test_load_options.py checks
# the list against Locust's parser): on Locust's command line these are --chattle-<name>.
LOCUST_OWNS = frozenset({"users", "spawn-rate"})
SWITCH = "switch"     # a flag without a value (store_true); its variable: any non-empty value
APPEND = "append"     # a flag given once per value


class Option:
    def __init__(self, name, kind, default, help, where=(RUN, LOCUST), chaos=None, choices=None, make=True,
                 metavar=None):
        self.name, self.kind, self.default, self.help = name, kind, default, help
        self.where, self.chaos, self.choices, self.make_variable_too = tuple(where), chaos, choices, make
        self.metavar = metavar

    @property
    def flag(self):
        return "--" + self.name

    @property
    def dest(self):
        return self.name.replace("-", "_")

    @property
    def variable(self):
        """The Makefile's variable: the name upper-cased, - as _; None when make passes none."""
        return self.dest.upper() if self.make_variable_too and (RUN in self.where or COMPARE in self.where) else None

    @property
    def locust_flag(self):
        return "--chattle-" + self.name if self.name in LOCUST_OWNS else self.flag

    @property
    def locust_dest(self):
        return self.locust_flag[2:].replace("-", "_")

    def help_text(self, **context):
        text = self.help.format(**context)
        if self.kind == SWITCH or self.default in (None, "") and self.chaos is None:
            return text
        default = "default %s" % shown(self.default)
        if self.chaos is not None:
            default += ", %s with --chaos" % shown(self.chaos)
        return "%s (%s)" % (text, default)

    def add_to(self, parser, locust=False, **context):
        """Declare this option on `parser` (Locust's, with locust=True)."""
        flag, dest = (self.locust_flag, self.locust_dest) if locust else (self.flag, self.dest)
        if self.kind == SWITCH:
            parser.add_argument(flag, dest=dest, action="store_true", help=self.help_text(**context))
            return
        if self.kind == APPEND:
            parser.add_argument(flag, dest=dest, action="append", default=[], metavar=self.metavar,
                                help=self.help_text(**context))
            return
        # Chaos-dependent defaults are settled after parsing (resolve_chaos_defaults); Locust
        # always gets a value from run.py, so its parser takes the plain default.
        default = self.default if locust or self.chaos is None else None
        parser.add_argument(flag, dest=dest, type=self.kind, default=default, choices=self.choices,
                            metavar=self.metavar, help=self.help_text(**context))


def shown(value):
    return "%g" % value if isinstance(value, float) else "(none)" if value == "" else str(value)


OPTIONS = [
    # -- the scenario: run.py's flags, passed on to the locustfile
    Option("users", int, 10000, "listeners holding a long-poll at the target (posters come on top)", chaos=2000),
    Option("duration", float, 150.0, "seconds of the whole stage table: ramp, hold, bursts, drain, ramp-down",
           chaos=60.0),
    Option("rooms", int, 1, "1 = one big room (maximum fan-out); more = listeners spread evenly over small rooms",
           chaos=4),
    Option("posters", int, 1, "users posting in bursts (a fixed count, spawned first)"),
    Option("burst-size", int, 5, "messages per burst, sent back to back"),
    Option("burst-gap", float, 8.0, "mean seconds of quiet after each burst, per poster"),
    Option("seed", int, 1, "seeds the posters' quiet gaps: the same seed makes the same schedule (and number of "
           "posts), so two runs compare; 0 draws a new one each run"),
    Option("poll-timeout", float, 20.0, "seconds each poll asks the server to hold it", chaos=5.0),
    Option("spawn-rate", float, 500.0, "listeners started per second during the ramp"),
    Option("stop-rate", float, 2500.0, "listeners stopped per second at ramp-down (each catches up on what is on "
           "its way)"),
    Option("lost-contact-seconds", float, 15.0, "a listener failing this long without one good answer gives up and "
           "is counted as lost contact, apart from messages lost by the server", chaos=60.0),
    Option("shape", str, "bursts", "bursts: ramp, hold, bursts, drain; steps: listeners held in steps of --step up "
           "to --users, one burst at each, ending at the first step whose p99 breaks --slo or whose delivery is "
           "incomplete", choices=("bursts", "steps")),
    Option("step", int, 2000, "listeners added per step (--shape steps)"),
    Option("slo", float, 500.0, "p99 wake-up objective of a step, in ms (--shape steps)"),
    # -- the servers and the bus: run.py's own
    Option("workers", int, 1, "server workers; more than 1 runs gunicorn on the shared Redis bus", where=(RUN,)),
    Option("host", str, "", "URL of a Chattle already running elsewhere, or several separated by commas (hosts "
           "sharing one Redis): then no server is started, listeners spread evenly over them, posts take turns, "
           "and each one's /stats is sampled", where=(RUN,)),
    Option("redis-cluster", str, "", "the server's bus on a Redis Cluster: `local` starts 3 masters and 3 replicas "
           "for the run (stopped at its end), or host:port[,...] of a running one; the report gives each shard's "
           "share (docs/cluster.md)", where=(RUN,)),
    Option("redis-wait", int, None, "with --redis-cluster: the server's --redis-wait (ms a post waits for a "
           "replica); default: the server's own (1000)", where=(RUN,)),
    Option("chaos", str, "", "a fault injected during the bursts, every accepted post judged lost silently, "
           "signalled or delivered (docs/faults.md): one of {faults}; several separated by commas, or all, run "
           "the matrix (each fault its own run, one table)", where=(RUN,)),
    Option("proxy", str, "", "nginx: Debian's nginx in front of the server this run starts, its configuration "
           "written from the server's limits (harness/proxy.py), and the same load run first without it, the "
           "proxy's cost side by side in the report", where=(RUN,), choices=("", "nginx")),
    Option("tls", SWITCH, False, "with --proxy nginx: TLS ended at nginx, with a CA and a certificate made for the "
           "run; the clients check it against that CA", where=(RUN,)),
    Option("ca-file", str, "", "a CA certificate (PEM) that https:// servers of --host are checked against "
           "(default: the system's CAs; with --tls the run's own CA)"),
    # -- the load generator: run.py's own, turned into Locust's options
    Option("client-processes", int, 0, "Locust worker processes beside the master (0: as few as the open-file "
           "limit allows, and over TLS one per 1000 listeners). One holds 10000 listeners at about half the "
           "server's CPU per delivery; more only help "
           "when the client lag says one is not keeping up and there are cores to spare", where=(RUN,)),
    Option("remote-workers", int, 0, "Locust workers on other hosts (`make load-worker MASTER=...`) to wait for; "
           "more than 0 starts none here", where=(RUN,)),
    Option("master-bind", str, LOOPBACK, "address the Locust master listens on; remote workers need one they can "
           "reach", where=(RUN,)),
    Option("master-port", int, 0, "port of the Locust master (0: 5557 with remote workers, else a free one)",
           where=(RUN,)),
    Option("worker-wait", float, 120.0, "seconds the master waits for its remote workers before it gives up",
           where=(RUN,)),
    Option("ui", SWITCH, False, "Locust's web page instead of a headless run, on 127.0.0.1 (its address is printed): "
           "the run starts at once, its tab 'Chattle live' shows held polls, deliveries per second and wake-up "
           "percentiles; Stop on the page ends the run as Ctrl-C does, with the same checks and report",
           where=(RUN,)),
    Option("report-root", str, REPORTS_ROOT, "directory that receives <timestamp>-load/ (tests point it at a temp "
           "dir)", where=(RUN,)),
    # -- base against head (loadtests/compare.py runs run.py once per round)
    Option("base", str, None, "compare with this git revision, round by round: the same seeded load against its "
           "server and this tree's (branch, tag, commit, HEAD~1; loadtests/compare.py)", where=(COMPARE,)),
    Option("rounds", int, 3, "with --base: the fewest runs of each side (at least 2); more are run, one round "
           "at a time, until every figure's interval resolves its threshold or --max-rounds or --time-limit is "
           "reached (loadtests/stopping.py)", where=(COMPARE,)),
    Option("max-rounds", int, 6, "with --base: the most rounds; the intervals of every look are widened for "
           "their number (max-rounds - rounds + 1) so the false-alarm rate holds", where=(COMPARE,)),
    Option("time-limit", float, 0.0, "with --base: seconds after which no further round is started (0: none)",
           where=(COMPARE,)),
    Option("order-seed", int, 0, "with --base: seeds the random order of the sides in every round (0: drawn, "
           "and printed so that it can be given again)", where=(COMPARE,)),
    Option("canary-threshold", float, 50.0, "with --base: a round whose canary (a fixed CPU loop timed before and "
           "after each run, instruments/canary.py) moved by more than this many percent is run again once",
           where=(COMPARE,)),
    Option("retries", int, 1, "with --base: times an invalid round (machine-bound, say) is run again, both sides; "
           "once one is still invalid after them, the other rounds run once each", where=(COMPARE,)),
    Option("allow-dirty", SWITCH, False, "with --base: compare a tree with uncommitted changes as head (the report "
           "says so)", where=(COMPARE,)),
    Option("head-env", APPEND, None, "with --base: set this for head's servers only (CHATTLE_BENCH_* of the "
           "environment are too)", where=(COMPARE,), make=False, metavar="NAME=VALUE"),
    Option("summary", str, None, "with --base: also append the verdict as Markdown to this file (a CI job's "
           "summary, $GITHUB_STEP_SUMMARY; loadtests/compare_summary.py)", where=(COMPARE,), metavar="FILE"),
    # -- what compare.py sets for each side's run; no make variable
    Option("server-root", str, ROOT, "the checkout whose chattle.py serves", where=(RUN,), make=False),
    Option("server-python", str, sys.executable, "the interpreter the server runs on", where=(RUN,), make=False),
    # -- the locustfile's own, which run.py sets from the above
    Option("servers", str, "", "comma-separated server URLs sharing one bus: listeners spread evenly over them, "
           "posts take turns (default: Locust's --host)", where=(LOCUST,)),
    Option("raw-dir", str, "", "where the master writes run.json", where=(LOCUST,)),
    Option("receipts", SWITCH, False, "every listener keeps each message it got (id, ts) per history it was in, "
           "for --chaos (instruments/judging.py); the held polls take the Python path", where=(LOCUST,)),
]
BY_NAME = {option.name: option for option in OPTIONS}


def declared(where):
    return [option for option in OPTIONS if where in option.where]


def add_to_parser(parser, where, locust=False, **context):
    for option in declared(where):
        option.add_to(parser, locust=locust, **context)


def resolve_chaos_defaults(args):
    """Options with a --chaos default take it when --chaos is given and they are not."""
    for option in OPTIONS:
        if option.chaos is not None and getattr(args, option.dest, 0) is None:
            setattr(args, option.dest, option.chaos if args.chaos else option.default)
    return args


def scenario_argv(args):
    """run.py's values of the options the locustfile declares, as Locust's command line."""
    argv = []
    for option in declared(RUN):
        if LOCUST in option.where:
            argv += [option.locust_flag, str(getattr(args, option.dest))]
    return argv


def from_locust(parsed):
    """Locust's parsed options under this table's names (users, not chattle_users)."""
    return argparse.Namespace(**{option.dest: getattr(parsed, option.locust_dest) for option in declared(LOCUST)})


def makefile():
    """loadtests/options.mk: a variable per option, and LOAD_ARGS passing each one given."""
    lines = ["# Written by `python -m loadtests.options --makefile > loadtests/options.mk` from the table in",
             "# loadtests/options.py: edit that, not this (tests/harness/test_load_options.py checks it).",
             "# make load NAME=value passes --name value; empty: the option's default",
             "# (python -m loadtests.run --help). A variable the Makefile declares with a value",
             "# before including this file (WORKERS) keeps it.", ""]
    variables = [option for option in OPTIONS if option.variable]
    lines += ["%s ?=" % option.variable for option in variables]
    passed = ["$(if $(%s),%s)" % (option.variable, option.flag) if option.kind == SWITCH else
              "$(if $(%s),%s $(%s))" % (option.variable, option.flag, option.variable) for option in variables]
    lines += ["", "LOAD_ARGS = $(strip \\"] + ["  %s \\" % item for item in passed[:-1]] + ["  %s)" % passed[-1]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--makefile"]:
        sys.exit("usage: python -m loadtests.options --makefile > loadtests/options.mk")
    sys.stdout.write(makefile())
