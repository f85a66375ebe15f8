"""Passing command-line options to registered constructors that differ in what they accept.

Only the options a user set reach a constructor (`given_options`): a parser default never replaces the default of
the constructor it lands in (LightningDiT's objective keeps its logit-normal times unless --weighting is given).
"""
import argparse
import inspect

PRESET_ATTRIBUTE = "omegadit_preset_options"  # the dests a --config file or a --recipe set, kept on the parser


def accepted_options(factory, options: dict, explicit: set, what: str) -> dict:
    """The options `factory` accepts. An option the user set explicitly (`explicit`) that it does not accept is
    an error naming `what`; unset options it does not accept are left out."""
    parameters = inspect.signature(factory).parameters
    refused = sorted(k for k in explicit if k in options and k not in parameters)
    if refused:
        flags = ", ".join("--" + k.replace("_", "-") for k in refused)
        raise ValueError(f"{what} does not take {flags}")
    return {k: v for k, v in options.items() if k in parameters}


def given_options(factory, args, names, what: str) -> dict:
    """The options among `names` that the user set (args.explicit), for `factory`; one it does not accept is an
    error naming `what`. Options left unset are not passed: the factory's own defaults apply."""
    explicit = set(args.explicit)
    return accepted_options(factory, {k: getattr(args, k) for k in names if k in explicit}, explicit, what)


def record_preset_options(parser, dests) -> None:
    """Note that a --config file or a --recipe set `dests` (they count as set by the user)."""
    setattr(parser, PRESET_ATTRIBUTE, getattr(parser, PRESET_ATTRIBUTE, set()) | set(dests))


def command_line_options(parser, argv=None) -> set:
    """Dests of the options given in argv (sys.argv[1:] when None), whatever their value: argv parsed once more
    into a namespace that holds a marker for every option, so only the options given replace it."""
    unset = object()
    namespace = argparse.Namespace()
    for action in parser._actions:
        if action.dest == argparse.SUPPRESS:
            continue
        accumulates = isinstance(action, (argparse._AppendAction, argparse._AppendConstAction,
                                          argparse._CountAction))
        setattr(namespace, action.dest, action.default if accumulates else unset)
    parsed, _ = parser.parse_known_args(argv, namespace)
    return {dest for dest, value in vars(parsed).items() if value is not unset}


def explicit_options(parser, args, argv=None) -> set:
    """Names of the options the user set: given on the command line (even at their default value), set by a
    --config file or a --recipe, or holding a value other than the parser's default (the original's flags
    that stand for ours)."""
    differing = {action.dest for action in parser._actions
                 if action.dest != "help" and getattr(args, action.dest, None) != action.default}
    given = command_line_options(parser, argv) | getattr(parser, PRESET_ATTRIBUTE, set())
    return (differing | given) & set(vars(args)) - {"help"}
