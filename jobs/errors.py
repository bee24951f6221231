"""Errors of the job contract, in a leaf module so that every store can raise them."""
from __future__ import annotations


class StoreError(RuntimeError):
    """The image store could not be written or read (unreachable, denied, disk full)."""
