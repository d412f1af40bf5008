"""Exceptions the CLI and the pipeline turn into clear messages instead of tracebacks."""


class RecsysError(Exception):
    """A problem the user can fix (bad file, bad option); its message says how."""


class EmptyInputError(RecsysError):
    """The input holds no rows at all."""
