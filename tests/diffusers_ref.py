"""diffusers as the numerical reference for the engine (a test-only dependency): the same weights,
prompt, sampler, seed and steps through diffusers' pipeline and through latentd's, each image as
int16 (H, W, 3), and the comparison every parity test makes (≤ 2/255)."""
from __future__ import annotations

import numpy as np
import torch

from latentd.model.pipeline import GenerationRequest

PROMPT = "a red cat and the dog"
# latentd sampler -> (diffusers scheduler class, its settings)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),         # its eta is a pipeline call argument (diffusers' default 0)
}


def reference(folder, sampler: str, guidance: float, seed: int, steps: int = 10,
              pipeline: str = "StableDiffusionPipeline", overlay: bool = False,
              scheduler: dict | None = None, **call) -> np.ndarray:
    """diffusers' image; overlay: with the init image pasted back outside the mask
    (VaeImageProcessor.apply_overlay, as latentd's inpainting output is); scheduler: settings
    over SCHEDULERS' (e.g. timestep_spacing)."""
    import diffusers

    ref = getattr(diffusers, pipeline).from_pretrained(folder, safety_checker=None,
                                                       requires_safety_checker=False)
    name, kw = SCHEDULERS[sampler]
    ref.scheduler = getattr(diffusers, name).from_config(ref.scheduler.config, **{**kw, **(scheduler or {})})
    ref.set_progress_bar_config(disable=True)
    out = ref(PROMPT, num_inference_steps=steps, guidance_scale=guidance,
              generator=torch.Generator("cpu").manual_seed(seed), **call)
    img = out.images[0]
    if overlay:
        img = ref.image_processor.apply_overlay(call["mask_image"], call["image"], img)
    return np.asarray(img).astype(np.int16)


def ours(p, steps: int = 10, **kw) -> np.ndarray:
    img = p.generate([GenerationRequest(PROMPT, steps=steps, **kw)])[0].image
    return np.asarray(img).astype(np.int16)


def check(got: np.ndarray, want: np.ndarray, what: str, tol: int = 2) -> None:
    diff = int(np.abs(got - want).max())
    print(f"{what}: max pixel diff {diff}/255")
    assert got.shape == want.shape == (64, 64, 3)
    assert want.std() > 5, "reference image is flat; the comparison would be vacuous"
    assert diff <= tol, what
