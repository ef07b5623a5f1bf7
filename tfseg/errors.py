"""User-facing errors: the CLI prints these as one line, without a traceback."""


class TfsegError(Exception):
    """A problem with the user's input (a file, a flag, a config) that the user can fix.

    The message names the file or flag and the problem in one line.
    """
