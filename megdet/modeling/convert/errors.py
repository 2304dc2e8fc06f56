"""The one error type of weight reading and conversion."""

from __future__ import annotations


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model; the message is one line and names
    the file (the command line prints it as ``megdet: error: ...``)."""
