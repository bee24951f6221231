"""SDXL in the engine on a tiny random SDXL folder (devkit/tiny_sdxl.py): equal to diffusers'
StableDiffusionXLPipeline on the same folder (Python API and `latentd generate`), the same alone
or in a mixed batch, and strict about bad weights and requests."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from latentd.model.errors import InvalidRequest, ModelLoadError
from latentd.model.pipeline import GenerationRequest, load_pipeline
from tests.diffusers_ref import PROMPT, SCHEDULERS

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]
NEG = "blue dog"


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    return load_pipeline(tiny_sdxl, safety=False)


@pytest.fixture(scope="module")
def ref(tiny_sdxl):
    r = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    r.set_progress_bar_config(disable=True)
    r.base_scheduler_config = r.scheduler.config      # each sampler's scheduler is made from this
    return r


def reference(ref, sampler: str, guidance: float, seed: int, width: int, height: int, negative: str = "",
              prompt: str = PROMPT, steps: int = 10) -> np.ndarray:
    name, kw = SCHEDULERS[sampler]
    ref.scheduler = getattr(diffusers, name).from_config(ref.base_scheduler_config, **kw)
    out = ref(prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
              width=width, height=height, generator=torch.Generator("cpu").manual_seed(seed))
    return np.asarray(out.images[0]).astype(np.int16)


def check(got: np.ndarray, want: np.ndarray, what: str, size: tuple[int, int], tol: int = 2) -> None:
    diff = int(np.abs(got - want).max())
    print(f"{what}: max pixel diff {diff}/255")
    assert got.shape == want.shape == (size[1], size[0], 3)
    assert want.std() > 5, "reference image is flat; the comparison would be vacuous"
    assert diff <= tol, what


CASES = [(s, k, g, size, neg) for s, k, g in (("euler", False, 7.5), ("dpmpp_2m", True, 7.5), ("ddim", False, 3.0))
         for size in ((64, 64), (64, 32)) for neg in ("", NEG)]


@pytest.mark.parametrize("sampler,karras,guidance,size,neg", CASES,
                         ids=[f"{c[0]}-{c[3][0]}x{c[3][1]}-{'neg' if c[4] else 'noneg'}" for c in CASES])
def test_image_matches_diffusers(pipe, ref, sampler, karras, guidance, size, neg):
    w, h = size
    want = reference(ref, sampler, guidance, seed=3, width=w, height=h, negative=neg)
    req = GenerationRequest(PROMPT, negative_prompt=neg, steps=10, sampler=sampler, karras=karras,
                            guidance_scale=guidance, seed=3, width=w, height=h)
    got = np.asarray(pipe.generate([req])[0].image).astype(np.int16)
    check(got, want, f"sdxl {sampler}{'+karras' if karras else ''} {w}x{h} neg={neg!r}", size)


def test_guidance_at_most_one_and_long_prompts_match_diffusers(pipe, ref):
    """guidance <= 1 runs the conditional rows only (diffusers: no classifier-free guidance), and
    a prompt over 77 tokens is cut by both tokenizers as diffusers cuts it."""
    long = " ".join(["a red cat"] * 40)
    for prompt, g, sampler in ((PROMPT, 1.0, "euler"), (PROMPT, 0.5, "dpmpp_2m"), (long, 7.5, "euler")):
        want = reference(ref, sampler, g, seed=4, width=64, height=64, prompt=prompt)
        out = pipe.generate([GenerationRequest(prompt, steps=10, sampler=sampler, karras=sampler == "dpmpp_2m",
                                               guidance_scale=g, seed=4, width=64, height=64)])[0]
        check(np.asarray(out.image).astype(np.int16), want, f"sdxl w={g} {len(prompt)} chars", (64, 64))
        assert out.warnings == (["prompt truncated to 77 tokens"] if prompt == long else [])


def test_cli_generate_matches_diffusers(tiny_sdxl, ref, tmp_path):
    from latentd.cli import main

    out = tmp_path / "cat.png"
    rc = main(["generate", PROMPT, "--model", str(tiny_sdxl), "--out", str(out), "--steps", "10",
               "--guidance", "7.5", "--sampler", "dpmpp_2m", "--karras", "--seed", "5", "--size", "32x64",
               "--no-safety", "--negative", NEG])
    assert rc == 0
    want = reference(ref, "dpmpp_2m", 7.5, seed=5, width=32, height=64, negative=NEG)
    check(np.asarray(Image.open(out).convert("RGB")).astype(np.int16), want, "sdxl cli dpmpp_2m 32x64", (32, 64))


def test_unet_matches_diffusers(pipe, ref):
    """The U-Net alone, with its added conditioning, on the same random inputs; and the added
    conditioning matters (a wrong wiring could not hide behind it)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 4, generator=g)
    t = torch.tensor([999.0, 500.0, 3.0])
    ctx = torch.randn(3, 77, 80, generator=g)
    added = {"text_embeds": torch.randn(3, 40, generator=g),
             "time_ids": torch.tensor([[64.0, 32, 0, 0, 64, 32], [32, 32, 4, 8, 64, 32], [1024, 1024, 0, 0, 64, 32]])}
    with torch.no_grad():
        want = ref.unet(x, t, ctx, added_cond_kwargs=added).sample
        got = pipe.unet(x, t, ctx, added)
        other = pipe.unet(x, t, ctx, {**added, "time_ids": added["time_ids"].flip(0)})
    assert (got - want).abs().max() < 1e-5
    assert (other - got).abs().max() > 1e-3
    with pytest.raises(ValueError, match="added conditioning"):
        pipe.unet(x, t, ctx)


def test_mixed_batch_equals_each_alone_bit_for_bit(pipe):
    """Different prompts, negative prompts, sizes (two latent sizes, and several requests of one),
    steps, samplers and guidance (incl. <= 1: no unconditional row) in one generate() call."""
    reqs = [GenerationRequest("a red cat", steps=6, sampler="euler_a", guidance_scale=7.5, seed=11),
            GenerationRequest("the dog", negative_prompt="red", steps=4, sampler="dpmpp_2m", karras=True,
                              guidance_scale=1.0, seed=12),
            GenerationRequest("and", steps=5, sampler="ddim", eta=0.5, guidance_scale=3.0, seed=13),
            GenerationRequest("cat", steps=3, sampler="euler", guidance_scale=0.5, seed=14, width=64, height=32),
            GenerationRequest("a dog", negative_prompt="cat", steps=4, sampler="ddpm", guidance_scale=5.0, seed=15,
                              width=64, height=32)]
    batched = pipe.generate(reqs)
    for r, b in zip(reqs, batched):
        solo = pipe.generate([r])[0]
        diff = np.abs(np.asarray(solo.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16)).max()
        print(f"{r.sampler} w={r.guidance_scale}: solo vs batch of {len(reqs)}, max pixel diff {diff}")
        assert np.array_equal(np.asarray(solo.image), np.asarray(b.image))
        assert b.image.size == (r.width or 64, r.height or 64)


def test_step_api_with_conditional_only_rows(pipe):
    """Requests with guidance <= 1 joining and leaving a running batch at the step level."""
    a = pipe.validate(GenerationRequest("a red cat", steps=4, sampler="euler_a", guidance_scale=1.0, seed=1))
    b = pipe.validate(GenerationRequest("the dog", steps=2, sampler="dpmpp_2m", guidance_scale=6.0, seed=2))
    ca, cb = pipe.encode([a, b])
    assert ca.pooled.shape == (1, 40) and ca.cond.shape == (1, 77, 80)
    sa = pipe.start(a, ca)
    assert sa.added["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]
    pipe.step([sa])
    sb = pipe.start(b, cb)
    pipe.step([sb, sa])
    pipe.step([sa, sb])
    pipe.step([sa])
    got = pipe.finish([sa, sb])
    for g, s in zip(got, pipe.generate([a, b])):
        assert np.array_equal(np.asarray(g.image), np.asarray(s.image))


def test_empty_negative_is_zeros_as_the_model_says(pipe, tiny_sdxl, tmp_path):
    """force_zeros_for_empty_prompt (model_index.json): no negative prompt -> zero context and
    pooled embedding; a negative prompt is encoded; with the flag off, "" is encoded."""
    c_none, c_neg = pipe.encode([GenerationRequest("a red cat"), GenerationRequest("a red cat", negative_prompt=NEG)])
    assert not c_none.uncond.any() and not c_none.uncond_pooled.any()
    assert c_neg.uncond.abs().sum() > 0 and c_neg.uncond_pooled.abs().sum() > 0
    assert torch.equal(c_none.cond, c_neg.cond) and torch.equal(c_none.pooled, c_neg.pooled)
    folder = tmp_path / "m"
    shutil.copytree(tiny_sdxl, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    p = load_pipeline(folder, safety=False)
    (c,) = p.encode([GenerationRequest("a red cat")])
    empty, pooled, _ = p.text.embed([""])
    assert torch.equal(c.uncond, empty) and torch.equal(c.uncond_pooled, pooled)


def test_model_info(pipe, tiny_sdxl, tmp_path):
    from latentd.model.family import SDXL_SIZES
    from latentd.model.info import read_model_info

    info = pipe.info
    assert info.family == "sdxl" and info.to_dict()["family"] == "sdxl"
    assert (info.native_width, info.native_height, info.size_multiple, info.sizes) == (64, 64, 32, ())
    assert read_model_info(tiny_sdxl) == info
    # the real SDXL's configs (sample_size 128: native 1024): its size buckets, and only those
    folder = tmp_path / "m"
    shutil.copytree(tiny_sdxl, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "sample_size": 128}))
    big = read_model_info(folder)
    assert (big.native_width, big.native_height, big.sizes) == (1024, 1024, SDXL_SIZES)
    assert big.size_error(1216, 832) is None and big.size_error(1024, 768)[0] == "width"
    (folder / "latentd.json").write_text('{"sizes": []}')          # lifted by the model's latentd.json
    assert read_model_info(folder).sizes == ()


def test_sd_requests_stay_sd_and_sdxl_takes_edits(pipe, tiny_model):
    """SD folders stay "sd"; an SDXL model validates edits (parity: tests/test_sdxl_edits.py)."""
    from latentd.model.info import read_model_info

    assert read_model_info(tiny_model).family == "sd"
    img = Image.new("RGB", (64, 64), (200, 10, 10))
    r = pipe.validate(GenerationRequest("a cat", init_image=img))
    assert (r.kind, r.strength, r.width, r.height) == ("img2img", 0.8, 64, 64)
    with pytest.raises(InvalidRequest) as e:
        pipe.validate(GenerationRequest("a cat", init_image=img.resize((48, 64))))
    assert e.value.field == "image"


def _rewrite(path, change) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


@pytest.mark.parametrize("part", ["unet", "text_encoder_2"])
def test_mismatched_weights_are_a_model_load_error(tiny_sdxl, tmp_path, part):
    folder = tmp_path / "m"
    shutil.copytree(tiny_sdxl, folder)
    weights = next((folder / part).glob("*.safetensors"))
    gone = "add_embedding.linear_1.weight" if part == "unet" else "text_projection.weight"

    def change(state):
        del state[gone]
        state["bogus.weight"] = torch.zeros(2)

    _rewrite(weights, change)
    with pytest.raises(ModelLoadError) as e:
        load_pipeline(folder, safety=False)
    msg = str(e.value)
    assert str(weights) in msg and gone in msg and "bogus.weight" in msg
    assert "missing keys" in msg and "unexpected keys" in msg


def test_context_width_mismatch_is_a_model_load_error(tiny_sdxl, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_sdxl, folder, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(ModelLoadError, match="text_encoder_2"):
        load_pipeline(folder, safety=False)


def test_model_info_is_torch_free(tiny_sdxl):
    code = ("import sys\nfrom latentd.model.info import read_model_info\n"
            f"i = read_model_info({str(tiny_sdxl)!r})\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nprint(i.family)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["sdxl"]


def test_worker_executor_runs_sdxl_as_generate_does(pipe):
    """The worker's batching executor (Pipeline.encode/start/step/finish, requests joining as
    others run) gives each SDXL request the image generate() gives it alone."""
    from latentd.worker.executor import BatchExecutor, Finished

    reqs = {"a": GenerationRequest("a red cat", steps=5, sampler="euler_a", seed=21),
            "b": GenerationRequest("the dog", negative_prompt=NEG, steps=3, sampler="ddim", guidance_scale=1.0,
                                   seed=22),
            "c": GenerationRequest("cat and dog", steps=4, sampler="dpmpp_2m", karras=True, seed=23,
                                   width=64, height=32)}
    ex = BatchExecutor(pipe, max_batch=16)
    done = {}
    for i in range(100):
        if i < len(reqs):                        # one more request joins every iteration
            rid = list(reqs)[i]
            ex.add(rid, "k", pipe.validate(reqs[rid]))
        elif ex.idle:
            break
        done |= {ev.request_id: ev for ev in ex.iterate() if isinstance(ev, Finished)}
    assert set(done) == set(reqs)
    for rid, req in reqs.items():
        assert np.array_equal(np.asarray(done[rid].image.image), np.asarray(pipe.generate([req])[0].image)), rid
