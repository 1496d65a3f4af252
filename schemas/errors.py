"""The one exception type that commands turn into a one-line message and a non-zero exit."""


class GapError(Exception):
    """A user-facing error: its message is one line that names the sample, key or path."""

    exit_code = 1


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``: any exception as one line of a log or a record.

    >>> one_line(ValueError("bad pixel\\nat row 3"))
    'ValueError: bad pixel'
    >>> one_line(KeyError())
    'KeyError'
    """
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
