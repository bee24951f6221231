"""Latent consistency models (Song et al. 2023; Luo et al. 2023): the parameterisation shared by the
LCM sampler (model/samplers.py) and latent consistency distillation (training/lcm_train.py).

A consistency function maps any point of a probability-flow ODE trajectory to its origin:
    f(x, t) = c_skip(t) x + c_out(t) x0(x, t)                       (Luo et al. 2023, eq. 5)
with x0(x, t) the model's denoised estimate and the boundary scalings of LCM's reference code
    c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2),  c_out(t) = s t / sqrt((s t)^2 + sigma_data^2),
sigma_data = 0.5, s = timestep_scaling = 10, so that f(x, 0) = x (c_skip(0) = 1, c_out(0) = 0).

The distillation and the sampler use a skipping grid on the T training steps: ORIGINAL_STEPS
points k*c - 1, c = T // ORIGINAL_STEPS (LCM's "original_inference_steps", 50 by default).
"""
from __future__ import annotations

import numpy as np

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
ORIGINAL_STEPS = 50


def boundary_scalings(t, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING):
    """(c_skip, c_out) at timesteps t (numpy array or torch tensor, any shape)."""
    st = t * timestep_scaling
    c_skip = sigma_data ** 2 / (st ** 2 + sigma_data ** 2)
    c_out = st / (st ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


def origin_timesteps(T: int = 1000, original_steps: int = ORIGINAL_STEPS, strength: float = 1.0) -> np.ndarray:
    """The skipping grid, ascending: [c-1, 2c-1, ..., ] with c = T // original_steps (int64)."""
    c = T // original_steps
    return np.arange(1, int(original_steps * strength) + 1, dtype=np.int64) * c - 1
