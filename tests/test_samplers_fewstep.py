"""Few-step samplers (LCM, TCD) and per-request timestep spacing in the engine.

Trajectories (the fixed denoiser of tests/test_samplers.py) and images (the tiny random SD
models) equal to diffusers' LCMScheduler and TCDScheduler (eta 0, TCD's default 0.3 and 1),
`timestep_spacing="trailing"` equal to diffusers' for Euler, DDIM and DPM-Solver++ 2M, LCM/TCD
edits (the tail of the plan) equal to diffusers' img2img pipeline, a batch mixing them with other
samplers equal to each request alone bit for bit, and bad eta / spacing / steps named by field.
"""
from __future__ import annotations

import numpy as np
import pytest

from latentd.model.errors import InvalidRequest
from latentd.model.pipeline import GenerationRequest, load_pipeline
from latentd.model.request import DEFAULT_ETA, SPACING_SAMPLERS, SPACINGS
from latentd.model.samplers import make_plan
from latentd.model.schedule import schedule_from_config
from tests.diffusers_ref import check, ours, reference
from tests.test_edits_engine import init_image
from tests.test_samplers import LINEAR, SD1, SD2V
from tests.test_samplers import ours as ours_trajectory
from tests.test_samplers import reference as reference_trajectory

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]

CLASSES = {"lcm": "LCMScheduler", "tcd": "TCDScheduler"}
STEPS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(tiny_model, safety=False)


@pytest.fixture(scope="module")
def pipe_sd2(tiny_model_sd2):
    return load_pipeline(tiny_model_sd2, safety=False)


# -- trajectories ------------------------------------------------------------------------------
TRAJ = [("lcm", None), ("tcd", 0.0), ("tcd", 0.3), ("tcd", 1.0)]
CONFIGS = {"SD1": SD1, "SD2V": SD2V, "LINEAR": LINEAR, "CLIP": dict(SD1, clip_sample=True),
           "GRID25": dict(SD1, original_inference_steps=25)}


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("sampler,eta", TRAJ, ids=[f"{s}-{e}" for s, e in TRAJ])
@pytest.mark.parametrize("steps", STEPS + (25,))
def test_trajectory_matches_diffusers(cfg_name, sampler, eta, steps):
    cfg = CONFIGS[cfg_name]
    cls = getattr(diffusers, CLASSES[sampler])
    want, want_t = reference_trajectory(cls, cfg, steps, seed=7, eta=eta)
    got, got_t = ours_trajectory(cfg, sampler, steps, seed=7, eta=eta)
    assert got_t == want_t                                  # the same integer grid points
    assert (got - want).abs().max().item() <= 2e-5 * max(1.0, want.abs().max().item())


def test_grid_timesteps_and_noise_draws():
    """LCM/TCD ignore the config's spacing and offset: 4 steps of the 50-point grid are
    999, 759, 499, 259; LCM draws noise at every step but the last, TCD only with eta > 0."""
    sched = schedule_from_config(SD1)
    for sampler in ("lcm", "tcd"):
        plan = make_plan(sched, sampler, 4)
        assert plan.timesteps.tolist() == [999, 759, 499, 259] and plan.init_sigma == 1.0
    assert make_plan(sched, "lcm", 4).draws.tolist() == [True, True, True, False]
    assert make_plan(sched, "tcd", 4).draws.tolist() == [True, True, True, False]     # eta 0.3
    assert not make_plan(sched, "tcd", 4, eta=0.0).draws.any()
    np.testing.assert_array_equal(make_plan(sched, "tcd", 4).coeffs,
                                  make_plan(sched, "tcd", 4, eta=DEFAULT_ETA["tcd"]).coeffs)


@pytest.mark.parametrize("sampler", SPACING_SAMPLERS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_spacing_override_is_the_config_key(sampler, spacing):
    """make_plan(spacing=X) on a config is exactly make_plan on that config with
    timestep_spacing=X (so diffusers' parity on such configs, tests/test_samplers.py, carries over)."""
    got = make_plan(schedule_from_config(SD1), sampler, 10, spacing=spacing)
    want = make_plan(schedule_from_config(dict(SD1, timestep_spacing=spacing)), sampler, 10)
    np.testing.assert_array_equal(got.coeffs, want.coeffs)
    assert got.init_sigma == want.init_sigma and got.draws.tolist() == want.draws.tolist()


# -- images --------------------------------------------------------------------------------------
IMAGES = [(s, e, n, g) for s, e in (("lcm", None), ("tcd", 0.0), ("tcd", None)) for n in STEPS
          for g in (1.0, 3.0)]


@pytest.mark.parametrize("sampler,eta,steps,guidance", IMAGES,
                         ids=[f"{s}-eta{e}-{n}-w{g:g}" for s, e, n, g in IMAGES])
def test_image_matches_diffusers_sd1(pipe, tiny_model, sampler, eta, steps, guidance):
    """eta None: the request leaves it out and gets TCD's default, diffusers is given it."""
    call = {} if sampler == "lcm" else {"eta": DEFAULT_ETA["tcd"] if eta is None else eta}
    want = reference(tiny_model, sampler, guidance, seed=3, steps=steps, **call)
    got = ours(pipe, steps=steps, sampler=sampler, eta=eta, guidance_scale=guidance, seed=3)
    check(got, want, f"sd1 {sampler} eta={eta} {steps} steps w={guidance}")


SD2_IMAGES = [("lcm", None, 4, 3.0), ("lcm", None, 2, 1.0), ("tcd", None, 4, 3.0), ("tcd", 0.0, 8, 1.0)]


@pytest.mark.parametrize("sampler,eta,steps,guidance", SD2_IMAGES,
                         ids=[f"{s}-eta{e}-{n}-w{g:g}" for s, e, n, g in SD2_IMAGES])
def test_image_matches_diffusers_sd2_v_prediction(pipe_sd2, tiny_model_sd2, sampler, eta, steps, guidance):
    assert pipe_sd2.schedule.prediction_type == "v_prediction"
    call = {} if sampler == "lcm" else {"eta": DEFAULT_ETA["tcd"] if eta is None else eta}
    want = reference(tiny_model_sd2, sampler, guidance, seed=5, steps=steps, **call)
    got = ours(pipe_sd2, steps=steps, sampler=sampler, eta=eta, guidance_scale=guidance, seed=5)
    check(got, want, f"sd2 (v) {sampler} eta={eta} {steps} steps w={guidance}")


# DDIM at guidance 3 (float32 rounding grows fast on this random network, see test_pipeline.py)
TRAILING = [("euler", 7.5), ("ddim", 3.0), ("dpmpp_2m", 7.5)]


@pytest.mark.parametrize("sampler,guidance", TRAILING, ids=[s for s, _ in TRAILING])
def test_trailing_spacing_matches_diffusers(pipe, tiny_model, sampler, guidance):
    req = pipe.validate(GenerationRequest("x", steps=6, sampler=sampler, timestep_spacing="trailing"))
    assert pipe._plan(req).timesteps[0] == 999            # the model's config says leading
    want = reference(tiny_model, sampler, guidance, seed=4, steps=6,
                     scheduler={"timestep_spacing": "trailing", "use_karras_sigmas": False})
    got = ours(pipe, steps=6, sampler=sampler, guidance_scale=guidance, seed=4, timestep_spacing="trailing")
    check(got, want, f"sd1 {sampler} trailing w={guidance}")


EDITS = [("lcm", 4, 0.5), ("tcd", 4, 0.75), ("tcd", 8, 0.3)]


@pytest.mark.parametrize("sampler,steps,strength", EDITS, ids=[f"{s}-{n}-{st}" for s, n, st in EDITS])
def test_img2img_is_the_tail_as_diffusers_img2img_pipeline(pipe, tiny_model, sampler, steps, strength):
    """Of `steps` grid points the last int(steps * strength) run, from the init latent noised to
    the first of them: diffusers' StableDiffusionImg2ImgPipeline with LCMScheduler/TCDScheduler
    (not LatentConsistencyModelImg2ImgPipeline, which shortens the grid instead)."""
    call = {} if sampler == "lcm" else {"eta": DEFAULT_ETA["tcd"]}
    want = reference(tiny_model, sampler, 3.0, seed=6, steps=steps, pipeline="StableDiffusionImg2ImgPipeline",
                     image=init_image(), strength=strength, **call)
    req = GenerationRequest("x", steps=steps, sampler=sampler, init_image=init_image(), strength=strength)
    assert pipe.validate(req).run_steps == int(steps * strength)
    got = ours(pipe, steps=steps, sampler=sampler, guidance_scale=3.0, seed=6, init_image=init_image(),
               strength=strength)
    check(got, want, f"img2img {sampler} {steps} steps strength {strength}")
    again = ours(pipe, steps=steps, sampler=sampler, guidance_scale=3.0, seed=6, init_image=init_image(),
                 strength=strength)
    np.testing.assert_array_equal(got, again)


# -- batching ------------------------------------------------------------------------------------
def test_mixed_batch_equals_each_alone_bit_for_bit(pipe):
    reqs = [GenerationRequest("a red cat", steps=4, sampler="lcm", guidance_scale=1.5, seed=21),
            GenerationRequest("the dog", steps=6, sampler="tcd", guidance_scale=3.0, seed=22),
            GenerationRequest("the dog", steps=2, sampler="tcd", eta=0.0, guidance_scale=1.0, seed=23),
            GenerationRequest("and", negative_prompt="red", steps=5, sampler="dpmpp_2m", karras=True,
                              guidance_scale=7.5, seed=24),
            GenerationRequest("a red cat", steps=3, sampler="euler", guidance_scale=7.5, seed=25),
            GenerationRequest("a red cat", steps=3, sampler="euler", timestep_spacing="trailing",
                              guidance_scale=7.5, seed=25),
            GenerationRequest("a cat", steps=8, sampler="lcm", init_image=init_image(), strength=0.5,
                              guidance_scale=2.0, seed=26)]
    batched = [np.asarray(g.image) for g in pipe.generate(reqs)]
    for i, r in enumerate(reqs):
        alone = np.asarray(pipe.generate([r])[0].image)
        assert np.array_equal(batched[i], alone), f"request {i} ({r.sampler}) differs in the batch"
    assert not np.array_equal(batched[4], batched[5])      # the spacing is the request's
    assert batched[0].std() > 5 and batched[1].std() > 5


def test_tcd_default_eta_is_filled_in_and_stochastic(pipe):
    req = pipe.validate(GenerationRequest("x", steps=2, sampler="tcd"))
    assert req.eta == DEFAULT_ETA["tcd"] == 0.3
    assert pipe.validate(GenerationRequest("x", sampler="ddim")).eta == 0.0
    assert pipe.validate(GenerationRequest("x", sampler="lcm")).eta == 0.0
    default, explicit, gamma0 = (np.asarray(pipe.generate([GenerationRequest("x", steps=2, sampler="tcd",
                                                                             seed=8, **kw)])[0].image)
                                 for kw in ({}, {"eta": 0.3}, {"eta": 0.0}))
    assert np.array_equal(default, explicit) and not np.array_equal(default, gamma0)


# -- bad values ----------------------------------------------------------------------------------
BAD = [(dict(sampler="tcd", eta=1.5), "eta"), (dict(sampler="tcd", eta=float("nan")), "eta"),
       (dict(sampler="euler", eta=0.3), "eta"), (dict(sampler="lcm", eta=0.3), "eta"),
       (dict(sampler="tcd", eta="0.3"), "eta"),
       (dict(sampler="euler", timestep_spacing="cosine"), "timestep_spacing"),
       (dict(sampler="lcm", timestep_spacing="trailing"), "timestep_spacing"),
       (dict(sampler="tcd", timestep_spacing="leading"), "timestep_spacing"),
       (dict(sampler="lcm", steps=51), "steps"), (dict(sampler="tcd", karras=True), "karras")]


@pytest.mark.parametrize("kw,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_values_name_the_field(pipe, kw, field):
    with pytest.raises(InvalidRequest) as e:
        pipe.validate(GenerationRequest("a cat", **kw))
    assert e.value.field == field and e.value.allowed is not None


def test_messages_list_what_applies():
    sched = schedule_from_config(SD1)
    with pytest.raises(InvalidRequest, match="ddim and tcd") as e:
        make_plan(sched, "lcm", 4, eta=0.5)
    assert e.value.field == "eta" and e.value.allowed == ["ddim", "tcd"]
    with pytest.raises(InvalidRequest, match="linspace, leading, trailing") as e:
        make_plan(sched, "ddim", 4, spacing="uniform")
    assert e.value.field == "timestep_spacing"
    with pytest.raises(InvalidRequest, match="skipping grid") as e:
        make_plan(sched, "tcd", 4, spacing="trailing")
    assert e.value.field == "timestep_spacing"
    with pytest.raises(InvalidRequest) as e:
        make_plan(sched, "lcm", 51)
    assert e.value.field == "steps"
