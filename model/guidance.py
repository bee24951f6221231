"""Classifier-free guidance and the eps/v parameterisations, as thin wrappers around U-Net output.

Classifier-free guidance (Ho & Salimans 2022, eq. 6, in the diffusers/SD convention where
w = 1 means "conditional only"):  out = out_u + w (out_c - out_u), w per sample.

Parameterisations, for a variance-preserving input z = alpha x0 + sigma eps (alpha^2 + sigma^2 = 1):
  epsilon      (Ho et al. 2020):       eps = out,                  x0 = (z - sigma eps) / alpha
  v_prediction (Salimans & Ho 2022):   v = alpha eps - sigma x0,   x0 = alpha z - sigma v,
                                                                   eps = alpha v + sigma z
"""
from __future__ import annotations

import torch


def guide(out_u: torch.Tensor, out_c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): out_u + w (out_c - out_u).
    out_u, out_c: (B, C, h, w); w: (B, 1, 1, 1) per-sample guidance scale."""
    return out_u + w * (out_c - out_u)


def to_x0_eps(out: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
              prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Model output -> (x0, eps). out, z: (B, C, h, w); alpha, sigma: (B, 1, 1, 1) VP coefficients
    of the U-Net's input z at this step."""
    if prediction_type == "epsilon":
        return (z - sigma * out) / alpha, out
    if prediction_type == "v_prediction":
        return alpha * z - sigma * out, alpha * out + sigma * z
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def from_eps(eps: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
             prediction_type: str) -> torch.Tensor:
    """The inverse of to_x0_eps for a (possibly shifted) eps: the model output that gives it.
    epsilon: eps itself; v_prediction: v = alpha eps - sigma x0 with x0 = (z - sigma eps) / alpha."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * (z - sigma * eps) / alpha
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
