"""Memory layout of activations. CPU convolutions pick their kernel (and so their rounding) by
layout, so code that gathers or rebuilds activations keeps the layout it was given."""
from __future__ import annotations

import torch


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last if a 4-D x is stored that way (a caller's choice, faster for CPU convolutions)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
