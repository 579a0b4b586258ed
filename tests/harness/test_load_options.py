"""make load's options are declared once, in loadtests/options.py: `make load NAME=`,
`python -m loadtests.run --name` and the locustfile's Locust option are one option, with
one name and one default."""

import os
import subprocess

from loadtests import options, run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEADLINE = 120


def locust_parser():
    """Locust's own argument parser with the locustfile's options added, as `locust -f` makes it."""
    from locust import argument_parser

    from loadtests import locustfile
    parser = argument_parser.get_empty_argument_parser()
    argument_parser.setup_parser_arguments(parser)
    locustfile.add_options(parser)
    return parser


def locusts_own():
    """(flags, dests) of Locust's own options."""
    from locust import argument_parser
    parser = argument_parser.get_empty_argument_parser()
    argument_parser.setup_parser_arguments(parser)
    return ({flag for action in parser._actions for flag in action.option_strings},
            {action.dest for action in parser._actions})


def test_an_option_takes_its_own_name_on_locusts_command_line_unless_locust_owns_it():
    flags, dests = locusts_own()
    wrong = []
    for option in options.declared(options.LOCUST):
        if (option.flag in flags) != (option.name in options.LOCUST_OWNS):
            wrong.append("%s: Locust %s it; LOCUST_OWNS %s" % (option.flag, "has" if option.flag in flags else
                                                                "lacks", "lists it" if option.name in
                                                                options.LOCUST_OWNS else "does not"))
        if option.locust_flag in flags or option.locust_dest in dests:
            wrong.append("%s: Locust's own %s" % (option.name, option.locust_flag))
    assert not wrong, "\n".join(wrong)


def test_the_locustfile_takes_what_run_gives_it_with_the_same_values():
    given = ["--users", "321", "--duration", "77", "--rooms", "3", "--posters", "2", "--burst-size", "4",
             "--burst-gap", "1.5", "--seed", "9", "--poll-timeout", "7", "--spawn-rate", "250", "--stop-rate", "900",
             "--lost-contact-seconds", "11", "--shape", "steps", "--step", "100", "--slo", "250", "--ca-file", "ca.pem"]
    args = run.parse_args(given)
    parsed = locust_parser().parse_args(options.scenario_argv(args))
    scenario = options.from_locust(parsed)
    passed = [option for option in options.declared(options.RUN) if options.LOCUST in option.where]
    assert sorted("--" + option.name for option in passed) == sorted(given[::2])
    for option in passed:
        assert getattr(scenario, option.dest) == getattr(args, option.dest), option.name


def test_the_locustfiles_defaults_are_runs():
    defaults = options.from_locust(locust_parser().parse_args([]))
    plain = run.parse_args([])
    for option in options.declared(options.RUN):
        if options.LOCUST in option.where:
            assert getattr(defaults, option.dest) == getattr(plain, option.dest) == option.default, option.name


def test_chaos_changes_the_defaults_it_names_and_no_given_value():
    chaos = run.parse_args(["--chaos", "worker-kill", "--rooms", "2"])
    assert (chaos.users, chaos.duration, chaos.rooms) == (options.BY_NAME["users"].chaos,
                                                          options.BY_NAME["duration"].chaos, 2)


def test_options_mk_is_what_the_table_writes():
    with open(os.path.join(ROOT, "loadtests", "options.mk")) as written:
        assert written.read() == options.makefile(), (
            "loadtests/options.mk is stale: python -m loadtests.options --makefile > loadtests/options.mk")


def test_make_load_passes_each_variable_as_its_flag():
    """`make -n load NAME=value ...` (prints the recipes, runs none): every variable of the
    table reaches python -m loadtests.run as --name value."""
    variables = [option for option in options.OPTIONS if option.variable]
    assignments = ["%s=%s" % (option.variable, "1" if option.kind == options.SWITCH else "v%d" % number)
                   for number, option in enumerate(variables)]
    done = subprocess.run(["make", "-n", "--no-print-directory", "-C", ROOT, "load", *assignments],
                          capture_output=True, text=True, timeout=DEADLINE, env=dict(os.environ, MAKEFLAGS=""))
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if "-m loadtests.run" in line)
    expected = " ".join(option.flag if option.kind == options.SWITCH else "%s v%d" % (option.flag, number)
                        for number, option in enumerate(variables))
    assert line.split("-m loadtests.run ", 1)[1] == expected
