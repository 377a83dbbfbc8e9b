"""The one exception type for mistakes a user can fix."""


class LipganError(Exception):
    """A user error: the message says what went wrong and what to do.

    The CLI prints the message on one line, without a traceback, and exits with status 2.
    """
