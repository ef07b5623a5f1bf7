"""User-facing errors: the CLI prints these as one line, without a traceback."""


class TfsegError(Exception):
    """A problem with the user's input (a file, a flag, a config) that the user can fix.

    The message names the file or flag and the problem in one line.
    """


def safe(text) -> str:
    """``text`` with control characters escaped, for one-line messages (a file may be named
    ``"a\nerror: b.png"``)."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (escaped), else its type's name: the
    reason part of a one-line error."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return safe(lines[0].strip()) if lines else type(e).__name__
