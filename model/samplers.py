"""Samplers as pure functions: a per-request Plan of per-step coefficients, and one update rule.

Every sampler here is, per step i, an affine update of the current latent x:

    x_next = a x + b x0 + c eps + d x0_prev + s z,      z ~ N(0, I) from the request's generator

where x0/eps are the model's denoised sample / noise estimate at step i (guidance.py turns the
U-Net output into both), x0_prev is the previous step's x0 (DPM-Solver++ 2M only) and the
U-Net sees  c_in x  at timestep t. `make_plan` precomputes (t, c_in, alpha, sigma, a, b, c, d, s)
for every step in float64, once per request; `advance` applies them. Both are pure: a request's
state is (x, x0_prev, step index, generator), so requests with different samplers, step counts and
schedules share one U-Net call and each gets the same numbers alone or in a batch.

Edits (SDEdit, Meng et al. 2022) run the tail of the same plan: `strength` drops the first
steps - int(steps * strength) rows (model.request.start_step), and the chain starts from the init
latent x0 noised to the first remaining row, x = (alpha x0 + sigma eps) / c_in (the forward
closed form, Ho et al. 2020 §2, in the sampler's space). Inpainting with a text-to-image U-Net
blends, after step i, the init latent noised to the next row's level back into the unmasked
region: columns ka, kb hold (alpha/c_in, sigma/c_in) of row i+1, and (1, 0) after the last step.

Spaces: ddpm, ddim, dpmpp_2m, lcm and tcd run on the variance-preserving latent
x = alpha x0 + sigma eps (alpha = sqrt(abar), sigma = sqrt(1 - abar)); euler and euler_a on the
variance-exploding latent x = x0 + sigma_ve eps (Karras et al. 2022), which the U-Net sees as
c_in x, c_in = 1/sqrt(sigma_ve^2 + 1).

Timesteps: ddpm, ddim, euler, euler_a and dpmpp_2m follow a timestep spacing (the request's, else
the scheduler config's); lcm and tcd step on the consistency skipping grid (model/consistency.py)
and ignore the config's spacing and steps_offset, as diffusers' LCMScheduler and TCDScheduler do.
Their edits run the tail of the full plan too, which is what diffusers' StableDiffusionImg2Img /
Inpaint pipelines do with these schedulers; diffusers' LatentConsistencyModelImg2ImgPipeline
instead runs all `steps` on the grid's first int(ORIGINAL_STEPS * strength) points
(set_timesteps(strength=...)), which latentd does not do.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from latentd.model import consistency
from latentd.model.errors import InvalidRequest
from latentd.model.guidance import to_x0_eps
from latentd.model.request import KARRAS_SAMPLERS as KARRAS
from latentd.model.request import (SAMPLERS, SPACING_SAMPLERS, check_eta, check_spacing, default_eta,
                                   start_step)
from latentd.model.precision import to_device
from latentd.model.schedule import (NoiseSchedule, dpm_timesteps, interp_sigmas, karras_sigmas,
                            sigma_to_t, spaced_timesteps)

# diffusers' default timestep_spacing per scheduler class, used when the config does not say.
_DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "euler": "linspace",
                    "euler_a": "linspace", "dpmpp_2m": "linspace"}
COEFFS = ("t", "c_in", "alpha", "sigma", "clip", "a", "b", "c", "d", "s", "ka", "kb")


@dataclass(frozen=True)
class Plan:
    """Per-request sampling plan: (steps,) arrays, one entry per denoising step."""

    sampler: str
    steps: int
    init_sigma: float            # the initial latent is  init_sigma * randn(...)
    coeffs: np.ndarray           # (steps, 12) float64, columns COEFFS ("clip": |x0| bound, inf = none)
    draws: np.ndarray            # (steps,) bool: draw z from the generator at this step
    start: int = 0               # rows of the full schedule skipped (edits: strength < 1)

    def noise_coeffs(self, i: int = 0) -> tuple[float, float]:
        """(alpha/c_in, sigma/c_in) of row i: x = ka x0 + kb eps is x0 noised to row i's level in
        the sampler's space (the edit's initial latent at i = 0)."""
        r = self.coeffs[i]
        c_in = r[COEFFS.index("c_in")]
        return r[COEFFS.index("alpha")] / c_in, r[COEFFS.index("sigma")] / c_in

    def column(self, name: str) -> np.ndarray:
        return self.coeffs[:, COEFFS.index(name)]

    @property
    def timesteps(self) -> np.ndarray:
        return self.column("t")


def _vp(abar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.sqrt(abar), np.sqrt(1.0 - abar)


def _vp_from_sigma(sig: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VE sigma -> VP (alpha, sigma): alpha = 1/sqrt(sigma^2+1), sigma_vp = sigma alpha."""
    alpha = 1.0 / np.sqrt(sig**2 + 1.0)
    return alpha, sig * alpha


def make_plan(sched: NoiseSchedule, sampler: str, steps: int, karras: bool = False,
              eta: float | None = None, strength: float | None = None, spacing: str | None = None) -> Plan:
    """The Plan for one request (pure: same inputs, same plan). eta: None = the sampler's default
    (model.request.default_eta). strength: an edit's plan, the last int(steps * strength) rows of
    the full one. spacing: linspace | leading | trailing, None = the scheduler config's."""
    if sampler not in SAMPLERS:
        raise InvalidRequest("sampler", f"unknown sampler {sampler!r}; one of: {', '.join(SAMPLERS)}")
    if karras and sampler not in KARRAS:
        raise InvalidRequest("karras", f"Karras sigmas apply to {', '.join(KARRAS)} only")
    T = sched.num_train_timesteps
    if not 1 <= steps <= T:
        raise InvalidRequest("steps", f"must be between 1 and {T}")
    eta = default_eta(sampler, eta)
    check_eta(sampler, eta)
    check_spacing(sampler, spacing)
    if sampler in SPACING_SAMPLERS and spacing is None:
        spacing = sched.get("timestep_spacing", _DEFAULT_SPACING[sampler])
    offset = int(sched.get("steps_offset", 0))
    build = {"ddpm": _ddpm, "ddim": _ddim, "euler": _euler, "euler_a": _euler,
             "dpmpp_2m": _dpmpp_2m, "lcm": _lcm, "tcd": _tcd}[sampler]
    start = start_step(steps, strength)
    if start >= steps:
        raise InvalidRequest("strength", f"int(steps x strength) must be at least 1, got {strength!r}")
    full = build(sched, sampler, steps, spacing, offset, karras, eta, start)
    alpha, sigma, c_in = (full.column(k) for k in ("alpha", "sigma", "c_in"))
    coeffs = full.coeffs.copy()
    coeffs[:, COEFFS.index("ka")] = np.append((alpha / c_in)[1:], 1.0)    # clean after the last step
    coeffs[:, COEFFS.index("kb")] = np.append((sigma / c_in)[1:], 0.0)
    return Plan(sampler, steps - start, full.init_sigma, coeffs[start:].copy(),
                full.draws[start:].copy(), start)


def _plan(sampler, steps, init_sigma, clip, draws, **cols) -> Plan:
    n = len(cols["t"])
    coeffs = np.zeros((n, len(COEFFS)), dtype=np.float64)
    coeffs[:, COEFFS.index("clip")] = np.inf if clip is None else clip
    for k, v in cols.items():
        coeffs[:, COEFFS.index(k)] = v
    return Plan(sampler, n, float(init_sigma), coeffs, np.asarray(draws, dtype=bool))


def _clip(sched: NoiseSchedule, default: bool = True) -> float | None:
    """x0 clipping of DDPM/DDIM/LCM configs (clip_sample; its default: on for DDPM and DDIM, off
    for LCM, as in their reference schedulers)."""
    return float(sched.get("clip_sample_range", 1.0)) if sched.get("clip_sample", default) else None


def _ddpm(sched, sampler, steps, spacing, offset, karras, eta, start=0) -> Plan:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) on a strided schedule: with
    alpha_t = abar_t / abar_prev, beta_t = 1 - alpha_t, the step is the posterior mean (eq. 7)
        x_prev = sqrt(abar_prev) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x
    plus sigma_t z with sigma_t^2 = beta~_t = (1 - abar_prev) / (1 - abar_t) beta_t (eq. 7), z drawn
    while t > 0. With x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t) this is exactly Algorithm 2."""
    acp = sched.alphas_cumprod
    t = spaced_timesteps(sched.num_train_timesteps, steps, spacing, offset, rounded=True)
    ti = t.astype(np.int64)
    abar = acp[ti]
    abar_prev = np.append(abar[1:], 1.0)          # after the last step: abar = 1 (clean)
    alpha_t = abar / abar_prev
    beta_t = 1.0 - alpha_t
    var = np.maximum((1.0 - abar_prev) / (1.0 - abar) * beta_t, 1e-20)
    draws = ti > 0
    alpha, sigma = _vp(abar)
    return _plan(sampler, steps, 1.0, _clip(sched), draws, t=t, c_in=1.0, alpha=alpha, sigma=sigma,
                 a=np.sqrt(alpha_t) * (1.0 - abar_prev) / (1.0 - abar),
                 b=np.sqrt(abar_prev) * beta_t / (1.0 - abar),
                 s=np.where(draws, np.sqrt(var), 0.0))


def _ddim(sched, sampler, steps, spacing, offset, karras, eta, start=0) -> Plan:
    """DDIM (Song et al. 2021, eq. 12):
        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma_t^2) eps + sigma_t z,
        sigma_t = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev)   (eq. 16).
    The previous timestep is t - T//steps; below 0 it is abar = 1 (set_alpha_to_one) or abar_0."""
    T = sched.num_train_timesteps
    acp = sched.alphas_cumprod
    t = spaced_timesteps(T, steps, spacing, offset, rounded=True)
    ti = t.astype(np.int64)
    prev = ti - T // steps
    final = 1.0 if sched.get("set_alpha_to_one", True) else acp[0]
    abar = acp[ti]
    abar_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], final)
    var = (1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)
    std = eta * np.sqrt(var)
    alpha, sigma = _vp(abar)
    draws = np.full(len(t), eta > 0)
    return _plan(sampler, steps, 1.0, _clip(sched), draws, t=t, c_in=1.0, alpha=alpha, sigma=sigma,
                 b=np.sqrt(abar_prev), c=np.sqrt(np.maximum(1.0 - abar_prev - std**2, 0.0)), s=std)


def _euler_sigmas(sched, steps, spacing, offset, karras) -> tuple[np.ndarray, np.ndarray]:
    """(t (steps,), sigma (steps+1,)) for the Euler samplers: sigmas interpolated at the spaced
    timesteps, or Karras sigmas (eq. 5) between the first and last of those mapped back to t."""
    all_s = sched.sigmas
    t = spaced_timesteps(sched.num_train_timesteps, steps, spacing, offset, rounded=False)
    sig = interp_sigmas(t, all_s)
    if karras:
        lo = float(sched.get("sigma_min", sig[-1]))
        hi = float(sched.get("sigma_max", sig[0]))
        sig = karras_sigmas(lo, hi, steps)
        t = sigma_to_t(sig, all_s)
    last = all_s[0] if sched.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
    sig = np.append(sig, last).astype(np.float32).astype(np.float64)
    return t, sig


def _euler(sched, sampler, steps, spacing, offset, karras, eta, start=0) -> Plan:
    """Euler (Karras et al. 2022, Algorithm 1 without churn): d = (x - x0)/sigma = eps,
        x_next = x + (sigma_next - sigma) eps.
    Euler ancestral (k-diffusion sample_euler_ancestral): step to sigma_down, add sigma_up z,
        sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),
        sigma_down = sqrt(sigma_next^2 - sigma_up^2)."""
    t, sig = _euler_sigmas(sched, steps, spacing, offset, karras)
    cur, nxt = sig[:-1], sig[1:]
    if sampler == "euler_a":
        up = np.sqrt(nxt**2 * (cur**2 - nxt**2) / cur**2)
        target, draws = np.sqrt(nxt**2 - up**2), np.ones(len(t), dtype=bool)
    else:
        up, target, draws = np.zeros(len(t)), nxt, np.zeros(len(t), dtype=bool)
    smax = sig.max()
    init = smax if spacing in ("linspace", "trailing") else np.sqrt(smax**2 + 1.0)
    alpha, sigma = _vp_from_sigma(cur)
    return _plan(sampler, steps, init, None, draws, t=t, c_in=1.0 / np.sqrt(cur**2 + 1.0),
                 alpha=alpha, sigma=sigma, a=1.0, c=target - cur, s=up)


def _dpmpp_2m(sched, sampler, steps, spacing, offset, karras, eta, start=0) -> Plan:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data prediction, lambda = log(alpha/sigma):
        h = lambda_next - lambda, r = h_prev / h,
        D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev,
        x_next = (sigma_next/sigma) x - alpha_next (exp(-h) - 1) D.
    First order (D = x0) at the first step run (row `start` for an edit: no x0_prev yet) and at
    the last when the final sigma is 0 (or lower_order_final with < 15 steps / euler_at_final),
    as DPM-Solver++ recommends."""
    all_s = sched.sigmas
    T = sched.num_train_timesteps
    if karras:
        lo = float(sched.get("sigma_min", all_s[0]))
        hi = float(sched.get("sigma_max", all_s[-1]))
        sig = karras_sigmas(lo, hi, steps)
        t = sigma_to_t(sig, all_s).round()
    else:
        t = dpm_timesteps(T, steps, spacing, offset)
        sig = interp_sigmas(t, all_s)
    zero_final = sched.get("final_sigmas_type", "zero") == "zero"
    sig = np.append(sig, 0.0 if zero_final else all_s[0]).astype(np.float32).astype(np.float64)
    n = len(t)
    alpha, sigma = _vp_from_sigma(sig)                        # (n+1,)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)                    # lambda_n+1 = +inf when sigma = 0
    a = np.zeros(n); b = np.zeros(n); d = np.zeros(n)
    low_final = (bool(sched.get("euler_at_final", False))
                 or (bool(sched.get("lower_order_final", True)) and n < 15) or zero_final)
    for i in range(n):
        h = lam[i + 1] - lam[i]
        a[i] = sigma[i + 1] / sigma[i]
        phi = -alpha[i + 1] * np.expm1(-h)                   # -alpha_next (exp(-h) - 1)
        if i <= start or (i == n - 1 and low_final):
            b[i] = phi
        else:
            r = (lam[i] - lam[i - 1]) / h
            b[i], d[i] = phi * (1.0 + 0.5 / r), -phi * 0.5 / r
    return _plan(sampler, steps, 1.0, None, np.zeros(n, dtype=bool), t=t, c_in=1.0,
                 alpha=alpha[:-1], sigma=sigma[:-1], a=a, b=b, d=d)


def _grid(sched, steps) -> np.ndarray:
    """(steps,) descending int64 timesteps of LCM/TCD: the skipping grid's (Luo et al. 2023) N points,
    largest first, at indices floor(linspace(0, N, steps, endpoint=False))."""
    n = int(sched.get("original_inference_steps", consistency.ORIGINAL_STEPS))
    if steps > n:
        raise InvalidRequest("steps", f"at most {n} steps on the skipping grid of {n} points")
    origin = consistency.origin_timesteps(sched.num_train_timesteps, n)[::-1]     # (N,) descending
    return origin[np.floor(np.linspace(0, len(origin), steps, endpoint=False)).astype(np.int64)]


def _lcm(sched, sampler, steps, spacing, offset, karras, eta, start=0) -> Plan:
    """Multistep latent consistency sampling (Luo et al. 2023; Song et al. 2023, Algorithm 1): the
    consistency function f = c_skip x + c_out x0 (eq. 5, model/consistency.py) maps x at t to the
    trajectory's origin, which is noised again to the next grid point,
        x_prev = sqrt(abar_prev) (c_skip x + c_out x0) + sqrt(1 - abar_prev) z,
    z drawn at every step but the last, whose output is f itself (so the previous timestep is
    never below 0 and set_alpha_to_one does not matter). x0 is clipped only if the config says
    clip_sample (LCMScheduler's default: off)."""
    acp = sched.alphas_cumprod
    t = _grid(sched, steps)
    abar = acp[t]
    last = np.arange(steps) == steps - 1
    abar_prev = np.where(last, 1.0, acp[np.append(t[1:], 0)])        # 1: f itself at the last step
    scaling = float(sched.get("timestep_scaling", consistency.TIMESTEP_SCALING))
    c_skip, c_out = consistency.boundary_scalings(t.astype(np.float64), timestep_scaling=scaling)
    alpha, sigma = _vp(abar)
    keep = np.sqrt(abar_prev)
    return _plan(sampler, steps, 1.0, _clip(sched, default=False), ~last, t=t.astype(np.float64),
                 c_in=1.0, alpha=alpha, sigma=sigma, a=keep * c_skip, b=keep * c_out,
                 s=np.sqrt(1.0 - abar_prev))


def _tcd(sched, sampler, steps, spacing, offset, karras, eta, start=0) -> Plan:
    """Strategic stochastic sampling of Trajectory Consistency Distillation (Zheng et al. 2024),
    gamma = eta: from t, jump along the trajectory to s = floor((1 - gamma) t_prev) with
    the model's (x0, eps), then forward-diffuse from s to the next grid point t_prev:
        x_s    = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps,
        x_prev = sqrt(abar_prev / abar_s) x_s + sqrt(1 - abar_prev / abar_s) z,
    z drawn at every step but the last when gamma > 0; gamma = 0 (and the last step, t_prev = 0)
    is x_prev = x_s. s is computed in float32, as diffusers' TCDScheduler does; no x0 clipping."""
    acp = sched.alphas_cumprod
    t = _grid(sched, steps)
    prev = np.append(t[1:], 0)
    s_t = np.floor(np.float32(1.0 - eta) * prev.astype(np.float32)).astype(np.int64)
    abar, abar_prev, abar_s = acp[t], acp[prev], acp[s_t]
    draws = np.full(steps, eta > 0) & (np.arange(steps) < steps - 1)
    ratio = np.where(draws, abar_prev / abar_s, 1.0)                  # 1: x_prev = x_s
    alpha, sigma = _vp(abar)
    return _plan(sampler, steps, 1.0, None, draws, t=t.astype(np.float64), c_in=1.0, alpha=alpha,
                 sigma=sigma, b=np.sqrt(ratio * abar_s), c=np.sqrt(ratio * (1.0 - abar_s)),
                 s=np.sqrt(1.0 - ratio))


def step_coeffs(plans: list[Plan], idx: list[int], device=None) -> dict[str, torch.Tensor]:
    """Coefficients of step idx[r] of plans[r] for each row r: name -> (B, 1, 1, 1) float32."""
    rows = np.stack([p.coeffs[i] for p, i in zip(plans, idx)])          # (B, 12) float64
    k = torch.from_numpy(rows).to(torch.float32)
    if device is not None:                  # one pinned, non-blocking copy per step (no host sync)
        k = to_device(k, torch.device(device))
    return {name: k[:, j].view(-1, 1, 1, 1) for j, name in enumerate(COEFFS)}


def denoise_step(x: torch.Tensor, out: torch.Tensor, k: dict[str, torch.Tensor], prediction_type: str,
                 x0_prev: torch.Tensor | None, noise: torch.Tensor | None):
    """Guided model output `out` (B, C, h, w) at input k["c_in"] * x -> (x_next, x0)."""
    z = k["c_in"] * x                                                     # (B, C, h, w) U-Net input
    x0, eps = to_x0_eps(out, z, k["alpha"], k["sigma"], prediction_type)
    x0 = torch.clamp(x0, -k["clip"], k["clip"])
    return advance(x, x0, eps, x0_prev, k, noise), x0


def sample(plan: Plan, x: torch.Tensor, model_fn, prediction_type: str,
           generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
    """Run a whole plan for one latent x (1, C, h, w) (already scaled by plan.init_sigma).
    model_fn(z (1, C, h, w), t (1,) float32) -> model output; noise from `generator` (CPU)."""
    x0_prev = None
    for i in range(plan.steps):
        k = step_coeffs([plan], [i], x.device)
        out = model_fn(k["c_in"] * x, k["t"].view(1))
        noise = None
        if plan.draws[i]:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        x, x0_prev = denoise_step(x, out, k, prediction_type, x0_prev, noise)
        if callback is not None:
            callback(i, x, x0_prev)
    return x


def advance(x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, x0_prev: torch.Tensor | None,
            k: dict[str, torch.Tensor], noise: torch.Tensor | None) -> torch.Tensor:
    """One sampler step for a batch of rows, x_next = a x + b x0 + c eps + d x0_prev + s z.
    x, x0, eps, x0_prev, noise: (B, C, h, w) float32; k[name]: (B, 1, 1, 1) float32 coefficients.
    Elementwise only, so each row's result does not depend on its batch-mates."""
    out = k["a"] * x + k["b"] * x0 + k["c"] * eps                # (B, C, h, w)
    if x0_prev is not None:
        out = out + k["d"] * x0_prev
    if noise is not None:
        out = out + k["s"] * noise
    return out
