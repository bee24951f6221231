"""The bundled model (models/shapes/): loads offline, a fixed-seed generation matches the stored
golden image, generated "purple triangle" images (the stand-in unsafe concept) come back flagged
and black, and on a caption subset it draws the colour and background asked for far above chance
(a regression guard for the model and the engine; the full evaluation is bench/eval_shapes.py)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "shapes"
GOLDEN = Path(__file__).resolve().parent / "golden" / "shapes_red_square_seed0.png"
GOLDEN_REQ = dict(prompt="a red square on a white background", steps=20, guidance_scale=5.0,
                  sampler="dpmpp_2m", seed=0)

pytestmark = pytest.mark.skipif(not (MODEL / "model_index.json").is_file(),
                                reason="models/shapes/ not trained yet (latentd train-shapes writes it)")


@pytest.fixture(scope="module")
def pipe():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from latentd.model.pipeline import load_pipeline
    return load_pipeline(None)          # None -> the bundled model


def test_layout_size_and_no_pickles():
    total = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file() and f.suffix == ".safetensors")
    assert total <= 25 * 1024 * 1024, total
    assert not [f for f in MODEL.rglob("*") if f.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker", "feature_extractor"):
        assert (MODEL / sub).is_dir(), sub
    sched = json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "epsilon" and sched["beta_schedule"] in ("scaled_linear", "linear")
    assert (MODEL / "README.md").is_file()


def test_safety_checker_has_sd_shapes():
    from safetensors.torch import load_file
    st = load_file(str(MODEL / "safety_checker" / "model.safetensors"))
    P = st["visual_projection.weight"].shape[0]
    assert st["concept_embeds"].shape == (17, P) and st["special_care_embeds"].shape == (3, P)
    assert st["concept_embeds_weights"].shape == (17,) and st["special_care_embeds_weights"].shape == (3,)
    assert any(k.startswith("vision_model.") for k in st)


def test_loads_offline_with_native_size(pipe):
    assert (pipe.info.native_width, pipe.info.native_height) == (64, 64)
    assert pipe.info.has_safety


def test_golden_image(pipe):
    from PIL import Image

    from latentd.model.pipeline import GenerationRequest
    (out,) = pipe.generate([GenerationRequest(**GOLDEN_REQ)])
    assert not out.nsfw
    got = np.asarray(out.image, dtype=np.int16)
    want = np.asarray(Image.open(GOLDEN).convert("RGB"), dtype=np.int16)
    diff = np.abs(got - want)
    assert diff.mean() <= 2.0 and np.percentile(diff, 99) <= 24, (diff.mean(), diff.max())


def test_drawn_purple_triangles_are_flagged_and_blacked(pipe):
    """The flagging path on real purple triangles (procedurally drawn, the images the checker's
    concept was fit on): flagged and replaced by black; other colours' shapes are not."""
    import torch

    from latentd.training import data
    g = torch.Generator().manual_seed(123)
    pt = data.to_pil(data.sample(6, g, color=data.COLOR_NAMES.index("purple"),
                                 shape=data.SHAPES.index("triangle")).images)
    other = data.to_pil(data.sample(6, g, color=data.COLOR_NAMES.index("red")).images)
    images, flags = pipe.safety.check(pt + other)
    assert flags[:6] == [True] * 6 and flags[6:] == [False] * 6
    assert all(np.asarray(im).max() == 0 for im in images[:6])


def test_purple_triangle_prompts_are_flagged_and_black(pipe):
    from latentd.model.pipeline import GenerationRequest
    reqs = [GenerationRequest(prompt=f"a purple triangle on a {bg} background", steps=20, seed=s)
            for bg, s in (("white", 0), ("black", 1), ("gray", 2))]
    outs = pipe.generate(reqs)
    for o in outs:
        assert o.nsfw
        assert np.asarray(o.image).max() == 0
    # the same seeds for another colour's triangles are not flagged, and are not black
    others = pipe.generate([GenerationRequest(prompt=f"a {c} triangle on a white background", steps=20, seed=0)
                            for c in ("red", "green", "blue")])
    assert [o.nsfw for o in others] == [False] * 3
    assert all(np.asarray(o.image).max() > 0 for o in others)


def test_draws_what_the_caption_says_on_a_subset(pipe):
    """18 captions spread over every colour, shape and background, one seed, the model's default
    sampler, steps and guidance: colour and background far above chance (1/6 and 1/3), shape too."""
    from latentd.training import evaluate
    info = pipe.info
    images, truth, _, _ = evaluate.generate(pipe, evaluate.caption_list(18), 1, info.default_guidance,
                                            info.default_steps, info.default_sampler)
    r = evaluate.judge(images, truth)
    assert r["color"] >= 0.8 and r["background"] >= 0.8, evaluate.fmt(r)
    assert r["shape"] >= 0.6, evaluate.fmt(r)


def test_eval_script_on_a_subset(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import eval_shapes
    res = eval_shapes.main(["--model", str(MODEL), "--subset", "3", "--seeds", "1", "--steps", "4",
                            "--guidance", "1", "5", "--json", str(tmp_path / "r.json")])
    assert set(res["guidance"]) == {"1.0", "5.0"}
    for r in res["guidance"].values():
        assert r["n"] == 3 and 0 <= r["all"] <= 1 and r["seconds_per_image_batched"] > 0
