"""Noise schedules: betas -> alphas_cumprod, inference timesteps, sigmas, Karras sigmas.

Discrete-time DDPM forward process (Ho et al. 2020, §2): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
abar_t = prod_{s<=t} (1 - beta_s). The equivalent variance-exploding noise level used by the
k-diffusion-style samplers is sigma_t = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022, §2/App. C).

The discretisation choices (timestep spacing, steps_offset, sigma interpolation, Karras endpoints)
follow diffusers' scheduler configs so that a model's `scheduler/scheduler_config.json` means the
same thing here as there. Values are computed in float64 numpy from float32 alphas_cumprod (the
precision the checkpoints' schedulers use).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from latentd.model.errors import ModelLoadError
from latentd.model.info import check_prediction_type


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule plus the scheduler config keys that shape inference."""

    alphas_cumprod: np.ndarray          # (T,) float64 values of float32 abar_t
    prediction_type: str                 # epsilon | v_prediction
    config: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def sigmas(self) -> np.ndarray:
        """(T,) VE noise levels sigma_t = sqrt((1 - abar_t) / abar_t), ascending in t."""
        acp = torch.from_numpy(self.alphas_cumprod).to(torch.float32)
        return (((1 - acp) / acp) ** 0.5).double().numpy()

    def get(self, key: str, default):
        """A scheduler-config value, or `default` when the config does not set it (or sets null)."""
        v = self.config.get(key)
        return default if v is None else v


def betas_from_config(cfg: dict) -> torch.Tensor:
    """(T,) float32 betas. linear: beta_start..beta_end (Ho et al. 2020, §4);
    scaled_linear: (linspace(sqrt(beta_start), sqrt(beta_end)))**2 (Rombach et al. 2022, LDM)."""
    T = int(cfg.get("num_train_timesteps") or 1000)
    if cfg.get("trained_betas") is not None:
        return torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    start = float(cfg.get("beta_start") or 0.0001)
    end = float(cfg.get("beta_end") or 0.02)
    kind = cfg.get("beta_schedule") or "linear"
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float32)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2
    raise ModelLoadError(f"scheduler beta_schedule {kind!r} is not supported (linear | scaled_linear)")


def schedule_from_config(cfg: dict) -> NoiseSchedule:
    """NoiseSchedule from a diffusers `scheduler_config.json` dict."""
    pred = check_prediction_type(cfg.get("prediction_type"))
    if cfg.get("rescale_betas_zero_snr"):
        raise ModelLoadError("scheduler rescale_betas_zero_snr=true is not supported")
    betas = betas_from_config(cfg)
    acp = torch.cumprod(1.0 - betas, dim=0)  # abar_t (Ho et al. 2020, §2), float32 like the trainer
    return NoiseSchedule(alphas_cumprod=acp.double().numpy(), prediction_type=pred, config=dict(cfg))


def spaced_timesteps(T: int, steps: int, spacing: str, offset: int, *, rounded: bool) -> np.ndarray:
    """(steps,) descending inference timesteps in [0, T).
    linspace: evenly from T-1 to 0; leading: k*(T//steps) + offset; trailing: T - k*T/steps - 1."""
    if spacing == "linspace":
        t = np.linspace(0, T - 1, steps)
        t = t.round() if rounded else t.astype(np.float32).astype(np.float64)
        return t[::-1].copy()
    if spacing == "leading":
        return (np.arange(steps) * (T // steps))[::-1].astype(np.float64) + offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)) - 1.0
    raise ModelLoadError(f"scheduler timestep_spacing {spacing!r} is not supported "
                         "(linspace | leading | trailing)")


def dpm_timesteps(T: int, steps: int, spacing: str, offset: int) -> np.ndarray:
    """(steps,) timesteps of the DPM-Solver schedule: steps+1 points, the final (t=0 side) dropped."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].copy()
    if spacing == "leading":
        ratio = T // (steps + 1)
        return (np.arange(steps + 1) * ratio)[::-1][:-1].astype(np.float64) + offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)) - 1.0
    raise ModelLoadError(f"scheduler timestep_spacing {spacing!r} is not supported "
                         "(linspace | leading | trailing)")


def interp_sigmas(timesteps: np.ndarray, sigmas_all: np.ndarray) -> np.ndarray:
    """Sigma at (possibly fractional) timesteps, linear in t between training timesteps."""
    return np.interp(timesteps, np.arange(len(sigmas_all)), sigmas_all)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """(n,) descending sigmas, Karras et al. 2022 eq. 5:
    sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, sigmas_all: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma: linear interpolation in log-sigma between the two
    neighbouring training timesteps (the inverse of the discrete schedule, clamped to [0, T-1])."""
    log_all = np.log(sigmas_all)                                   # (T,) ascending
    log_s = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))
    lo = np.clip(np.searchsorted(log_all, log_s, side="right") - 1, 0, len(log_all) - 2)
    w = np.clip((log_all[lo] - log_s) / (log_all[lo] - log_all[lo + 1]), 0.0, 1.0)
    return (1 - w) * lo + w * (lo + 1)
