"""Samplers (model/samplers.py) against diffusers' reference schedulers, step by step.

The denoiser is a fixed, deterministic function of (x, t) (a channel-mixing linear map plus a
timestep-dependent term): a real function both implementations are run on, so trajectories must
agree to float32 rounding. The ancestral samplers draw their noise from the same per-request
generator as diffusers' pipeline does, so they must agree too.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy-2 notes inside diffusers

from latentd.model.errors import InvalidRequest  # noqa: E402
from latentd.model.guidance import guide, to_x0_eps  # noqa: E402
from latentd.model.samplers import advance, make_plan, sample  # noqa: E402
from latentd.model.schedule import (karras_sigmas, schedule_from_config, sigma_to_t,  # noqa: E402
                            spaced_timesteps)

SD1 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
           steps_offset=1, set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True)
SD2V = dict(SD1, prediction_type="v_prediction", timestep_spacing="leading")
TRAILING = dict(SD1, timestep_spacing="trailing")
LINEAR = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")

W = torch.tensor([[0.9, 0.05, 0.0, -0.1], [0.02, 0.8, 0.1, 0.0],
                  [0.0, -0.05, 0.95, 0.03], [0.1, 0.0, 0.02, 0.85]])


def denoiser(z: torch.Tensor, t) -> torch.Tensor:
    """(1, 4, h, w), t -> (1, 4, h, w): a fixed linear map of z plus a term depending on t."""
    t = float(torch.as_tensor(t).reshape(-1)[0])
    return torch.einsum("oc,bchw->bohw", W, z) * 0.5 + 0.1 * math.sin(t / 150.0)


def reference(cls, cfg, steps, seed, eta=None, **kw):
    sch = cls.from_config(cfg, **kw)
    sch.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((1, 4, 8, 8), generator=g) * sch.init_noise_sigma
    ts = []
    for t in sch.timesteps:
        out = denoiser(sch.scale_model_input(x, t), t)
        ts.append(float(t))
        extra = {"eta": eta} if eta is not None else {}
        x = sch.step(out, t, x, generator=g, **extra).prev_sample
    return x, ts


def ours(cfg, sampler, steps, seed, karras=False, eta=0.0):
    sched = schedule_from_config(cfg)
    plan = make_plan(sched, sampler, steps, karras=karras, eta=eta)
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((1, 4, 8, 8), generator=g) * plan.init_sigma
    return sample(plan, x, denoiser, sched.prediction_type, g), [float(t) for t in plan.timesteps]


CASES = [
    # (sampler, karras, diffusers class, extra config, eta)
    ("ddim", False, diffusers.DDIMScheduler, {}, None),
    ("ddim", False, diffusers.DDIMScheduler, {}, 0.7),
    ("ddpm", False, diffusers.DDPMScheduler, {}, None),
    ("euler", False, diffusers.EulerDiscreteScheduler, {}, None),
    ("euler", True, diffusers.EulerDiscreteScheduler, {"use_karras_sigmas": True}, None),
    ("euler_a", False, diffusers.EulerAncestralDiscreteScheduler, {}, None),
    ("dpmpp_2m", False, diffusers.DPMSolverMultistepScheduler,
     {"algorithm_type": "dpmsolver++", "solver_order": 2}, None),
    ("dpmpp_2m", True, diffusers.DPMSolverMultistepScheduler,
     {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}, None),
]


@pytest.mark.parametrize("cfg_name", ["SD1", "SD2V", "TRAILING", "LINEAR"])
@pytest.mark.parametrize("sampler,karras,cls,extra,eta", CASES,
                         ids=[f"{c[0]}{'-karras' if c[1] else ''}{'-eta' if c[4] else ''}" for c in CASES])
@pytest.mark.parametrize("steps", [10, 23])
def test_trajectory_matches_diffusers(cfg_name, sampler, karras, cls, extra, eta, steps):
    cfg = dict(globals()[cfg_name])
    want, want_t = reference(cls, cfg, steps, seed=7, eta=eta, **extra)
    got, got_t = ours(cfg, sampler, steps, seed=7, karras=karras, eta=eta or 0.0)
    np.testing.assert_allclose(got_t, want_t, rtol=0, atol=2e-3)
    scale = want.abs().max().item()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= 2e-4 * max(1.0, scale), (got - want).abs().max()


def test_ddpm_step_is_algorithm_2_written_out():
    """One DDPM step equals Ho et al. 2020 Algorithm 2 line 4 written out directly:
    x_{t-1} = 1/sqrt(alpha_t) (x_t - (1 - alpha_t)/sqrt(1 - abar_t) eps) + sigma_t z,
    alpha_t = abar_t/abar_prev on the strided schedule, sigma_t^2 = (1-abar_prev)/(1-abar_t) beta_t."""
    sched = schedule_from_config(dict(SD1, clip_sample=False))
    plan = make_plan(sched, "ddpm", 20)
    acp = torch.tensor(sched.alphas_cumprod, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((1, 4, 8, 8), generator=gen, dtype=torch.float64)
    eps = torch.randn((1, 4, 8, 8), generator=gen, dtype=torch.float64)
    z = torch.randn((1, 4, 8, 8), generator=gen, dtype=torch.float64)
    for i in (0, 7, 19):
        t = int(plan.timesteps[i])
        abar_t = acp[t]
        abar_prev = acp[int(plan.timesteps[i + 1])] if i + 1 < plan.steps else torch.tensor(1.0, dtype=torch.float64)
        alpha_t = abar_t / abar_prev
        beta_t = 1 - alpha_t
        sigma_t = torch.sqrt((1 - abar_prev) / (1 - abar_t) * beta_t)
        want = (x - beta_t / torch.sqrt(1 - abar_t) * eps) / torch.sqrt(alpha_t) + sigma_t * z
        k = {n: torch.tensor(plan.coeffs[i, j], dtype=torch.float64).view(1, 1, 1, 1)
             for j, n in enumerate(("t", "c_in", "alpha", "sigma", "clip", "a", "b", "c", "d", "s"))}
        x0, e = to_x0_eps(eps, x, k["alpha"], k["sigma"], "epsilon")
        got = advance(x, x0, e, None, k, z)
        assert plan.draws[i] == (t > 0)
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


def test_karras_sigmas_eq5_and_inverse():
    s = karras_sigmas(0.03, 14.6, 10)
    assert s[0] == pytest.approx(14.6) and s[-1] == pytest.approx(0.03)
    rho = 7.0
    i = np.arange(10)
    want = (14.6 ** (1 / rho) + i / 9 * (0.03 ** (1 / rho) - 14.6 ** (1 / rho))) ** rho
    np.testing.assert_allclose(s, want, rtol=1e-12)
    sched = schedule_from_config(SD1)
    # sigma_to_t inverts the discrete schedule at integer timesteps
    np.testing.assert_allclose(sigma_to_t(sched.sigmas[[0, 10, 500, 999]], sched.sigmas), [0, 10, 500, 999],
                               atol=1e-6)


def test_spacings():
    np.testing.assert_array_equal(spaced_timesteps(1000, 4, "leading", 1, rounded=True), [751, 501, 251, 1])
    np.testing.assert_array_equal(spaced_timesteps(1000, 4, "trailing", 0, rounded=True), [999, 749, 499, 249])
    np.testing.assert_array_equal(spaced_timesteps(1000, 4, "linspace", 0, rounded=True), [999, 666, 333, 0])


def test_guidance_per_sample():
    u = torch.zeros(3, 4, 2, 2)
    c = torch.ones(3, 4, 2, 2)
    w = torch.tensor([0.0, 1.0, 7.5]).view(3, 1, 1, 1)
    g = guide(u, c, w)
    assert g[0].eq(0).all() and g[1].eq(1).all() and g[2].eq(7.5).all()


def test_plan_rejects_bad_input():
    sched = schedule_from_config(SD1)
    with pytest.raises(InvalidRequest) as e:
        make_plan(sched, "heun", 10)
    assert e.value.field == "sampler"
    with pytest.raises(InvalidRequest) as e:
        make_plan(sched, "ddim", 10, karras=True)
    assert e.value.field == "karras"
