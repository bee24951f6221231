"""Engine errors. Both subclass ValueError so callers can catch either broadly.

InvalidRequest names the offending request field (the API turns it into a 422 that names the
field and its allowed range); ModelLoadError says what is wrong with a model on disk.
"""
from __future__ import annotations


class InvalidRequest(ValueError):
    """A generation request that cannot run: `field` is the request field, `message` the range."""

    def __init__(self, field: str, message: str, allowed: object = None):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.allowed = allowed          # the allowed range/values, JSON-safe (the API shows it)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class ModelLoadError(ValueError):
    """A model that cannot be loaded: missing/corrupt files, pickled weights, key/shape mismatch."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
