"""The one exception type that the command line turns into a one-line message."""


class DistrepError(Exception):
    """A problem the user can fix (bad input, missing data); its message is a single line."""
