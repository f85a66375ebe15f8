"""Passing command-line options to registered constructors that differ in what they accept."""
import inspect


def accepted_options(factory, options: dict, explicit: set, what: str) -> dict:
    """The options `factory` accepts. An option the user set explicitly (`explicit`) that it does not accept is
    an error naming `what`; unset options it does not accept are left out."""
    parameters = inspect.signature(factory).parameters
    refused = sorted(k for k in explicit if k in options and k not in parameters)
    if refused:
        flags = ", ".join("--" + k.replace("_", "-") for k in refused)
        raise ValueError(f"{what} does not take {flags}")
    return {k: v for k, v in options.items() if k in parameters}


def explicit_options(parser, args) -> set:
    """Names of the options whose value differs from the parser's default (set on the command line or in a
    config file)."""
    return {action.dest for action in parser._actions
            if action.dest != "help" and getattr(args, action.dest, None) != action.default}
