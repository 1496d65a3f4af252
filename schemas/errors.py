"""The one exception type that commands turn into a one-line message and a non-zero exit."""


class GapError(Exception):
    """A user-facing error: its message is one line that names the sample, key or path."""

    exit_code = 1
