"""Edits in the engine (model/edit.py) on the tiny random models: img2img equal to diffusers'
StableDiffusionImg2ImgPipeline and inpainting equal to StableDiffusionInpaintPipeline (a
4-channel U-Net blending the unmasked region, and a 9-channel inpainting U-Net), on the same
weights, image, mask, sampler, strength and seed; edits batched with text-to-image in one U-Net
call give the same images as alone, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentd.model.errors import InvalidRequest
from latentd.model.pipeline import GenerationRequest, load_pipeline
from tests.diffusers_ref import PROMPT, check, ours, reference

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(tiny_model, safety=False)


@pytest.fixture(scope="module")
def pipe9(tiny_model_inpaint):
    return load_pipeline(tiny_model_inpaint, safety=False)


def init_image(size: int = 64) -> Image.Image:
    """A structured RGB image: gradients plus a bright square."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a = np.stack([x, y, 1 - x * y], -1) * 200
    a[size // 4:size // 2, size // 8:size // 2] = (250, 240, 20)
    return Image.fromarray(a.astype(np.uint8))


def mask_image(size: int = 64) -> Image.Image:
    """White (repaint) over the right-middle block, black elsewhere."""
    a = np.zeros((size, size), np.uint8)
    a[size // 4: 3 * size // 4, size // 2:] = 255
    return Image.fromarray(a)


IMG2IMG = [(s, st) for s in ("euler_a", "dpmpp_2m") for st in (0.5, 0.8)]


@pytest.mark.parametrize("sampler,strength", IMG2IMG, ids=[f"{s}-{st}" for s, st in IMG2IMG])
def test_img2img_matches_diffusers(pipe, tiny_model, sampler, strength):
    want = reference(tiny_model, sampler, 7.5, seed=3, pipeline="StableDiffusionImg2ImgPipeline",
                     image=init_image(), strength=strength)
    got = ours(pipe, sampler=sampler, karras=sampler == "dpmpp_2m", guidance_scale=7.5, seed=3,
                init_image=init_image(), strength=strength)
    check(got, want, f"img2img {sampler} strength {strength}")


INPAINT = [("4ch", "euler_a", 1.0), ("4ch", "dpmpp_2m", 0.7), ("9ch", "euler", 1.0), ("9ch", "dpmpp_2m", 0.6)]


@pytest.mark.parametrize("unet,sampler,strength", INPAINT, ids=["-".join(map(str, c)) for c in INPAINT])
def test_inpaint_matches_diffusers(request, unet, sampler, strength):
    folder = request.getfixturevalue("tiny_model" if unet == "4ch" else "tiny_model_inpaint")
    p = request.getfixturevalue("pipe" if unet == "4ch" else "pipe9")
    assert p.info.inpaint_unet == (unet == "9ch") and p.info.latent_channels == 4
    want = reference(folder, sampler, 7.5, seed=5, pipeline="StableDiffusionInpaintPipeline", overlay=True,
                     image=init_image(), mask_image=mask_image(), strength=strength, height=64, width=64)
    got = ours(p, sampler=sampler, karras=sampler == "dpmpp_2m", guidance_scale=7.5, seed=5,
                init_image=init_image(), mask=mask_image(), strength=strength)
    check(got, want, f"inpaint {unet} {sampler} strength {strength}")


def test_4ch_inpaint_keeps_the_unmasked_latents(pipe):
    """The blend puts the init image's latent back outside the mask at the last step: the final
    latent equals E(image) there, exactly (both are the same float32 tensor)."""
    req = pipe.validate(GenerationRequest(PROMPT, steps=4, sampler="euler", seed=2, init_image=init_image(),
                                          mask=mask_image(), strength=1.0))
    (c,) = pipe.encode([req])
    s = pipe.start(req, c)
    while not s.done:
        pipe.step([s])
    keep = s.edit.mask == 0                                       # (1, 1, 8, 8)
    assert keep.any() and (~keep).any()
    k = keep.expand_as(s.latent)
    assert torch.equal(s.latent[k], s.edit.image_latent[k])
    assert not torch.equal(s.latent[~k], s.edit.image_latent[~k])


def _unet_rows(p):
    rows = []
    handle = p.unet.register_forward_hook(lambda m, args, out: rows.append(int(args[0].shape[0])))
    return rows, handle


@pytest.mark.parametrize("which", ["pipe", "pipe9"])
def test_edits_batch_with_text_to_image_bit_for_bit(request, which):
    p = request.getfixturevalue(which)
    reqs = [GenerationRequest("a red cat", steps=6, sampler="euler_a", seed=11, init_image=init_image(),
                              strength=0.6),
            GenerationRequest("the dog", negative_prompt="red", steps=5, sampler="dpmpp_2m", karras=True,
                              guidance_scale=3.0, seed=12, init_image=init_image(), mask=mask_image(),
                              strength=1.0),
            GenerationRequest("and", steps=5, sampler="ddim", eta=0.5, guidance_scale=1.0, seed=13),
            GenerationRequest("cat", steps=4, sampler="ddpm", seed=14, init_image=init_image(),
                              mask=mask_image(), strength=0.5)]
    rows, handle = _unet_rows(p)
    try:
        batched = p.generate(reqs)
    finally:
        handle.remove()
    assert rows[0] == 2 * len(reqs), "edits and text-to-image share one U-Net call"
    for r, b in zip(reqs, batched):
        solo = p.generate([r])[0]
        diff = np.abs(np.asarray(solo.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16)).max()
        print(f"{which} {r.sampler} edit={r.init_image is not None}: solo vs batch, max diff {diff}")
        assert np.array_equal(np.asarray(solo.image), np.asarray(b.image))


def test_edit_steps_follow_strength(pipe):
    req = pipe.validate(GenerationRequest("a cat", steps=10, sampler="euler", seed=1, init_image=init_image(),
                                          strength=0.35))
    (c,) = pipe.encode([req])
    s = pipe.start(req, c)
    assert s.total == 3 == req.run_steps and s.plan.start == 7
    seen = []
    pipe.generate([req], callback=lambda i, step, total: seen.append((step, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_default_strength_and_size_from_the_image(pipe):
    req = GenerationRequest("a cat", steps=10, sampler="ddim", seed=1, init_image=init_image(48).resize((48, 32)))
    r = pipe.validate(req)
    assert (r.width, r.height, r.kind, r.strength) == (48, 32, "img2img", 0.8)
    assert pipe.generate([req])[0].image.size == (48, 32)
    r = pipe.validate(GenerationRequest("a cat", init_image=init_image(), mask=mask_image()))
    assert (r.kind, r.strength) == ("inpaint", 1.0)


BAD = [
    (dict(strength=0.0), "strength"), (dict(strength=1.5), "strength"), (dict(strength=float("nan")), "strength"),
    (dict(strength=0.05, steps=10), "strength"), (dict(mask=Image.new("L", (32, 64))), "mask"),
    (dict(init_image=Image.new("RGB", (72, 64))), "image"), (dict(init_image=None, strength=0.5), "strength"),
    (dict(init_image=None, mask=Image.new("L", (64, 64))), "image"),
]


@pytest.mark.parametrize("kw,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_edits_name_the_field(pipe, kw, field):
    req = GenerationRequest(**{"prompt": "a cat", "init_image": init_image(), **kw})
    with pytest.raises(InvalidRequest) as e:
        pipe.validate(req)
    assert e.value.field == field and str(e.value).startswith(f"{field}: ")


def test_cli_generate_edits(tiny_model, tmp_path, capsys):
    from latentd.cli import main

    init, rgba = tmp_path / "init.png", tmp_path / "mask.png"
    init_image().save(init)
    m = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    m.paste((0, 0, 0, 0), (32, 16, 64, 48))           # transparent = repaint: the same region as mask_image()
    m.save(rgba)
    base = ["generate", "a red cat", "--model", str(tiny_model), "--steps", "4", "--sampler", "euler",
            "--seed", "3", "--no-safety", "--init-image", str(init)]
    out = tmp_path / "inpaint.png"
    assert main([*base, "--out", str(out), "--mask", str(rgba), "--strength", "1"]) == 0
    assert "strength=1" in capsys.readouterr().out
    pipe = load_pipeline(tiny_model, safety=False)
    want = pipe.generate([GenerationRequest("a red cat", steps=4, sampler="euler", seed=3, init_image=init_image(),
                                            mask=mask_image(), strength=1.0)])[0].image
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))   # alpha 0 = white = repaint
    assert main([*base, "--out", str(tmp_path / "i2i.png"), "--size", "48x32"]) == 0
    assert Image.open(tmp_path / "i2i.png").size == (48, 32)
    assert main([*base, "--out", str(tmp_path / "x.png"), "--strength", "1.5"]) == 2
    assert "invalid strength" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main([*base, "--out", str(tmp_path / "x.png"), "--mask", str(tmp_path / "bad.png")]) == 2
    assert "invalid mask" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_worker_executor_batches_edits_with_generations(pipe):
    """The worker's BatchExecutor: edits join the same U-Net calls as text-to-image requests
    (fewer calls than steps) and every image equals its solo run."""
    from latentd.worker.executor import BatchExecutor, Finished

    reqs = {"text": GenerationRequest("a red cat", steps=5, sampler="euler_a", seed=21),
            "img2img": GenerationRequest("the dog", steps=6, sampler="dpmpp_2m", seed=22,
                                         init_image=init_image(), strength=0.5),
            "inpaint": GenerationRequest("cat", steps=4, sampler="ddim", seed=23, init_image=init_image(),
                                         mask=mask_image(), strength=1.0)}
    ex = BatchExecutor(pipe, max_batch=8, band=float("inf"))
    for rid, r in reqs.items():
        ex.add(rid, "k", ex.pipe.validate(r))
    got = {}
    while not ex.idle:
        for ev in ex.iterate():
            assert not hasattr(ev, "code"), ev
            if isinstance(ev, Finished):
                got[ev.request_id] = np.asarray(ev.image.image)
    assert set(got) == set(reqs)
    runs = [r.run_steps for r in reqs.values()]                   # 5, 3, 4
    assert max(runs) <= ex.stats["unet_calls"] < sum(runs)
    for rid, r in reqs.items():
        assert np.array_equal(got[rid], np.asarray(pipe.generate([r])[0].image)), rid
