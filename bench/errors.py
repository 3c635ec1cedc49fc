"""User-facing errors.

A `BenchError` is bad usage or bad input: the CLI prints its message on one line and exits 2.
Anything else that escapes a cell is a failure of that cell, recorded in its result file.
"""


class BenchError(Exception):
    """Bad usage or input; the message names what is wrong (and what is available)."""


class NotApplicable(BenchError):
    """A method cannot run under the requested setting (e.g. a cut it does not support)."""
