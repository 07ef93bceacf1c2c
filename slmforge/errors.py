"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class SlmforgeError(Exception):
    """A problem with the user's input (a file, a flag, a config field), not a bug in slmforge."""
