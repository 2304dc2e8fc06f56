"""Errors raised for bad dataset files."""


class DatasetError(ValueError):
    """One-line error about a dataset file."""
