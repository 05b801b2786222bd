"""Errors heedful reports to people rather than as tracebacks."""


class InputError(ValueError):
    """Bad input (votes, config, options). The CLI prints the message on one line and exits with code 2."""


class ConfigError(InputError):
    """A priors config that cannot be used as written."""
