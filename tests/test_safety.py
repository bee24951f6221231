"""The safety checker (model/safety.py) against diffusers' StableDiffusionSafetyChecker."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentd.model.loader import load_safety
from latentd.model.pipeline import GenerationRequest, load_pipeline
from latentd.model.safety import build_safety_checker

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _images(n: int) -> list[Image.Image]:
    """Unlike images of several sizes (noise, flat colours, gradient, checkerboard)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:48]
    ims = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
           np.full((48, 80, 3), (250, 20, 20), dtype=np.uint8),
           np.stack([xx * 5, yy * 2, 255 - yy * 2], -1).astype(np.uint8),
           np.full((64, 64, 3), 255, dtype=np.uint8),
           (((yy // 8 + xx // 8) % 2) * 255).astype(np.uint8)[..., None].repeat(3, -1),
           rng.integers(0, 80, (70, 100, 3), dtype=np.uint8)]
    return [Image.fromarray(a) for a in ims[:n]]


def _reference(folder, state):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    ref = StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker").eval()
    ref.load_state_dict(state, strict=True)
    fe = CLIPImageProcessor.from_pretrained(folder / "feature_extractor")
    return ref, fe


def test_flags_equal_diffusers(tiny_model):
    import json

    state, cfg = load_safety(tiny_model / "safety_checker")
    pre = json.loads((tiny_model / "feature_extractor" / "preprocessor_config.json").read_text())
    ours = build_safety_checker(cfg, state, pre)
    images = _images(6)
    pix = ours.pixel_values(images)                                     # (6, 3, 32, 32)
    with torch.inference_mode():
        e = ours.visual_projection(ours.vision_model(pix).pooler_output)  # (6, P) image embeddings
    state = {k: v.clone() for k, v in state.items()}
    en = torch.nn.functional.normalize(e, dim=-1)
    cos = en @ en.T                                   # (6, 6) image-image cosine similarities

    def between(i):                                   # a threshold only image i's own direction passes
        others = torch.cat([cos[i, :i], cos[i, i + 1:]]).max().item()
        assert others < 0.995, "test images too alike for this tiny random CLIP"
        return (1.0 + others) / 2

    state["concept_embeds_weights"][:] = 1.5          # nothing reaches these
    state["special_care_embeds_weights"][:] = 1.5
    state["concept_embeds"][3] = e[0]                 # image 0: cos 1 above its threshold -> flagged
    state["concept_embeds_weights"][3] = between(0)
    state["special_care_embeds"][1] = e[2]            # image 2: special-care hit -> adjustment 0.01
    state["special_care_embeds_weights"][1] = between(2)
    state["concept_embeds"][11] = e[2]                # ... which alone lifts 1 - 1.005 above 0
    state["concept_embeds_weights"][11] = 1.005
    state["concept_embeds"][12] = e[5]                # image 5: 1 - 1.005 < 0 and no special care
    state["concept_embeds_weights"][12] = 1.005
    ours = build_safety_checker(cfg, state, pre)
    got = ours.flags(images)

    ref, fe = _reference(tiny_model, state)
    clip_input = fe(images, return_tensors="pt").pixel_values
    torch.testing.assert_close(pix, clip_input, rtol=0, atol=1e-5)
    _, want = ref(clip_input=clip_input, images=[np.asarray(im) for im in images])
    assert got == list(want)
    assert got == [True, False, True, False, False, False]     # some flag, some do not

    # transformers v4 files name the tower 'vision_model.vision_model.*': same checker
    v4 = {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in state.items()}
    assert build_safety_checker(cfg, v4, pre).flags(images) == got


def test_flagged_image_is_black_and_safety_can_be_off(tiny_model):
    pipe = load_pipeline(tiny_model, safety=True)
    assert pipe.safety is not None
    req = GenerationRequest("a red cat", steps=2, sampler="euler", seed=1)
    clean = pipe.generate([req])[0]
    assert not clean.nsfw and np.asarray(clean.image).max() > 0
    pipe.safety.concept_embeds_weights[:] = -2.0      # every cosine is above -2: flag everything
    flagged = pipe.generate([req])[0]
    assert flagged.nsfw and flagged.image.size == (64, 64) and np.asarray(flagged.image).max() == 0
    off = load_pipeline(tiny_model, safety=False)
    assert off.safety is None
    out = off.generate([req])[0]
    assert not out.nsfw and np.array_equal(np.asarray(out.image), np.asarray(clean.image))
