"""User-facing errors.

A `SlmError` is a problem with the user's input (a bad path, an invalid config value, a corrupt file). The CLI prints
its message as one line and exits non-zero; anything else is an internal error and keeps its traceback.
"""


class SlmError(Exception):
    """A user error: the message names the problem and what would fix it."""
