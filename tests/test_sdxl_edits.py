"""SDXL img2img and inpainting in the engine on tiny random SDXL folders (devkit/tiny_sdxl.py):
equal to diffusers' StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline loaded
from the same folder (a 4-channel U-Net blending the unmasked region, a 9-channel inpainting U-Net,
and a model that asks for aesthetic scores, requires_aesthetics_score), within 2/255 for Euler,
DPM++ 2M Karras and DDIM; SDXL edits batched with text-to-image give each request's solo image
bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from latentd.model.pipeline import GenerationRequest, load_pipeline
from tests.diffusers_ref import PROMPT, SCHEDULERS
from tests.test_edits_engine import init_image, mask_image

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]
NEG = "blue dog"


@pytest.fixture(scope="module")
def folders(tiny_sdxl, tmp_path_factory):
    from devkit.tiny_sdxl import make_tiny_sdxl

    root = tmp_path_factory.mktemp("sdxl_edits")
    return {"4ch": tiny_sdxl, "9ch": make_tiny_sdxl(root / "inpaint", seed=1, in_channels=9),
            "aesthetic": make_tiny_sdxl(root / "aesthetic", seed=2, aesthetics=True)}


@pytest.fixture(scope="module")
def pipes(folders):
    return {k: load_pipeline(f, safety=False) for k, f in folders.items()}


_REFS: dict = {}


def reference(folder, pipeline: str, sampler: str, guidance: float, seed: int, negative: str = "",
              steps: int = 10, overlay: bool = False, **call) -> np.ndarray:
    key = (str(folder), pipeline)
    if key not in _REFS:
        ref = getattr(diffusers, pipeline).from_pretrained(folder, add_watermarker=False)
        ref.set_progress_bar_config(disable=True)
        _REFS[key] = (ref, ref.scheduler.config)
    ref, base = _REFS[key]
    name, kw = SCHEDULERS[sampler]
    ref.scheduler = getattr(diffusers, name).from_config(base, **kw)
    out = ref(PROMPT, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
              generator=torch.Generator("cpu").manual_seed(seed), **call)
    img = out.images[0]
    if overlay:                     # latentd's inpainting output keeps the init image's pixels outside the mask
        img = ref.image_processor.apply_overlay(call["mask_image"], call["image"], img)
    return np.asarray(img).astype(np.int16)


def ours(p, **kw) -> np.ndarray:
    img = p.generate([GenerationRequest(PROMPT, steps=10, **kw)])[0].image
    return np.asarray(img).astype(np.int16)


def check(got, want, what: str, tol: int = 2) -> None:
    diff = int(np.abs(got - want).max())
    print(f"{what}: max pixel diff {diff}/255")
    assert got.shape == want.shape == (64, 64, 3)
    assert want.std() > 5, "reference image is flat; the comparison would be vacuous"
    assert diff <= tol, what


SAMPLERS = [("euler", False, 7.5), ("dpmpp_2m", True, 7.5), ("ddim", False, 3.0)]
IMG2IMG = [(m, s, k, g, st, neg) for m in ("4ch", "aesthetic") for (s, k, g) in SAMPLERS
           for st, neg in ((0.5, ""), (1.0, NEG))]


@pytest.mark.parametrize("model,sampler,karras,guidance,strength,neg", IMG2IMG,
                         ids=[f"{c[0]}-{c[1]}-{c[4]}-{'neg' if c[5] else 'noneg'}" for c in IMG2IMG])
def test_img2img_matches_diffusers(folders, pipes, model, sampler, karras, guidance, strength, neg):
    want = reference(folders[model], "StableDiffusionXLImg2ImgPipeline", sampler, guidance, seed=3, negative=neg,
                     image=init_image(), strength=strength)
    got = ours(pipes[model], sampler=sampler, karras=karras, guidance_scale=guidance, seed=3, negative_prompt=neg,
               init_image=init_image(), strength=strength)
    check(got, want, f"sdxl img2img {model} {sampler} strength {strength} neg={neg!r}")


INPAINT = [(m, s, k, g, st) for m in ("4ch", "9ch") for (s, k, g) in SAMPLERS for st in (1.0, 0.6)]


@pytest.mark.parametrize("model,sampler,karras,guidance,strength", INPAINT,
                         ids=[f"{c[0]}-{c[1]}-{c[4]}" for c in INPAINT])
def test_inpaint_matches_diffusers(folders, pipes, model, sampler, karras, guidance, strength):
    p = pipes[model]
    assert p.info.inpaint_unet == (model == "9ch")
    want = reference(folders[model], "StableDiffusionXLInpaintPipeline", sampler, guidance, seed=5, overlay=True,
                     image=init_image(), mask_image=mask_image(), strength=strength, height=64, width=64)
    got = ours(p, sampler=sampler, karras=karras, guidance_scale=guidance, seed=5, init_image=init_image(),
               mask=mask_image(), strength=strength)
    check(got, want, f"sdxl inpaint {model} {sampler} strength {strength}")


def test_aesthetic_ids_per_row(pipes):
    """requires_aesthetics_score: (orig h, orig w, crop top, crop left, score), 6.0 on the
    conditional row and 2.5 on the unconditional; the base model keeps its six size ids."""
    for model, want, want_u in (("aesthetic", [64, 32, 0, 0, 6.0], [64, 32, 0, 0, 2.5]),
                                ("4ch", [64, 32, 0, 0, 64, 32], [64, 32, 0, 0, 64, 32])):
        p = pipes[model]
        r = p.validate(GenerationRequest("cat", width=32, height=64, init_image=init_image().resize((32, 64))))
        s = p.start(r, p.encode([r])[0])
        assert s.added["time_ids"].tolist() == [want] and s.added_uncond["time_ids"].tolist() == [want_u]


def _unet_rows(p):
    rows = []
    handle = p.unet.register_forward_hook(lambda m, args, out: rows.append(int(args[0].shape[0])))
    return rows, handle


@pytest.mark.parametrize("model", ["4ch", "9ch", "aesthetic"])
def test_edits_batch_with_text_to_image_bit_for_bit(pipes, model):
    p = pipes[model]
    reqs = [GenerationRequest("a red cat", steps=6, sampler="euler_a", seed=11, init_image=init_image(),
                              strength=0.6),
            GenerationRequest("the dog", negative_prompt="red", steps=5, sampler="dpmpp_2m", karras=True,
                              guidance_scale=3.0, seed=12, init_image=init_image(), mask=mask_image(), strength=1.0),
            GenerationRequest("and", steps=5, sampler="ddim", eta=0.5, guidance_scale=1.0, seed=13),
            GenerationRequest("cat", steps=4, sampler="euler", guidance_scale=0.5, seed=14, init_image=init_image(),
                              mask=mask_image(), strength=0.5),
            GenerationRequest("a dog", steps=4, sampler="ddpm", seed=15)]
    rows, handle = _unet_rows(p)
    try:
        batched = p.generate(reqs)
    finally:
        handle.remove()
    # guidance <= 1 runs no unconditional row (requests 3 and 4)
    assert rows[0] == 2 * len(reqs) - 2, "edits and text-to-image share one U-Net call"
    for r, b in zip(reqs, batched):
        solo = p.generate([r])[0]
        assert np.array_equal(np.asarray(solo.image), np.asarray(b.image)), (model, r.sampler)


def test_worker_executor_batches_sdxl_edits(pipes):
    from latentd.worker.executor import BatchExecutor, Finished

    p = pipes["4ch"]
    reqs = {"text": GenerationRequest("a red cat", steps=5, sampler="euler_a", seed=21),
            "img2img": GenerationRequest("the dog", steps=6, sampler="dpmpp_2m", seed=22, init_image=init_image(),
                                         strength=0.5),
            "inpaint": GenerationRequest("cat", steps=4, sampler="ddim", seed=23, init_image=init_image(),
                                         mask=mask_image(), strength=1.0)}
    ex = BatchExecutor(p, max_batch=8, band=float("inf"))
    for rid, r in reqs.items():
        ex.add(rid, "k", p.validate(r))
    got = {}
    while not ex.idle:
        for ev in ex.iterate():
            assert not hasattr(ev, "code"), ev
            if isinstance(ev, Finished):
                got[ev.request_id] = np.asarray(ev.image.image)
    assert set(got) == set(reqs)
    for rid, r in reqs.items():
        assert np.array_equal(got[rid], np.asarray(p.generate([r])[0].image)), rid
