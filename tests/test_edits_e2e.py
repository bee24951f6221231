"""End to end: the official `openai` client's images.edit (image + mask) against a real uvicorn
API, redis-server and `latentd worker` on the bundled model. An inpainting edit keeps the image
outside the mask (compared with the init image's own VAE round trip, away from the mask's edge,
since the decoder's receptive field crosses it) and changes it inside; url and b64 responses,
JPEG/WebP output with the matching Content-Type."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from devkit.api_proc import ALICE, BOB, open_png, service_stack

MODEL = Path(__file__).resolve().parent.parent / "models" / "shapes"
FAST = {"steps": 12, "sampler": "dpmpp_2m"}
BOX = (16, 16, 48, 48)          # the region to repaint (left, top, right, bottom)
MARGIN = 8                      # pixels: compare "outside" this far from the box

pytestmark = pytest.mark.skipif(not (MODEL / "model_index.json").is_file(),
                                reason="models/shapes/ not trained yet")


@pytest.fixture(scope="module")
def edit_stack():
    with service_stack(MODEL) as s:
        yield s


@pytest.fixture(scope="module")
def client(edit_stack):
    from openai import OpenAI

    return OpenAI(base_url=edit_stack["api"].url + "/v1", api_key=ALICE, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def init_png(client) -> bytes:
    """An image the bundled model drew itself (so it lies where its VAE reconstructs well)."""
    res = client.images.generate(prompt="a red circle on a white background", size="64x64",
                                 response_format="b64_json", extra_body={"seed": 1, **FAST})
    return base64.b64decode(res.data[0].b64_json)


def rgba_mask() -> bytes:
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    im.paste((0, 0, 0, 0), BOX)                     # fully transparent = edit (OpenAI's rule)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _regions() -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:64, 0:64]
    l, t, r, b = BOX
    inside = (x >= l) & (x < r) & (y >= t) & (y < b)
    far = (x < l - MARGIN) | (x >= r + MARGIN) | (y < t - MARGIN) | (y >= b + MARGIN)
    return inside, far


def _round_trip(png: bytes) -> np.ndarray:
    """The init image through the bundled VAE (posterior mean, decode): what "unchanged" can mean."""
    import torch

    from latentd.model.edit import image_tensor
    from latentd.model.pipeline import load_pipeline

    pipe = load_pipeline(str(MODEL), safety=False)
    with torch.inference_mode():
        z = pipe.encoder.encode(image_tensor(Image.open(io.BytesIO(png)), 64, 64), None)
        return np.asarray(pipe._decode(z)[0]).astype(np.int16)


def test_openai_client_inpaints_only_the_masked_region(client, init_png):
    res = client.images.edit(image=("init.png", init_png, "image/png"), mask=("mask.png", rgba_mask(), "image/png"),
                             prompt="a blue square on a black background", response_format="b64_json",
                             extra_body={"seed": 2, "strength": 1.0, **FAST})
    assert len(res.data) == 1 and res.data[0].revised_prompt == "a blue square on a black background"
    out = np.asarray(open_png(base64.b64decode(res.data[0].b64_json)).convert("RGB")).astype(np.int16)
    ref = _round_trip(init_png)
    orig = np.asarray(Image.open(io.BytesIO(init_png)).convert("RGB")).astype(np.int16)
    inside, far = _regions()
    kept = np.abs(out - orig)[~inside]
    changed = np.abs(out - orig)[inside]
    near = np.abs(ref - orig)[far].mean()
    print(f"outside the mask: max diff {kept.max()}; inside: mean change {changed.mean():.2f}; "
          f"the VAE round trip alone is {near:.2f} off outside")
    assert kept.max() <= 2, "pixels outside the mask changed"
    assert changed.mean() > 10, "the masked region did not change"


def test_url_response_grayscale_mask_and_jpeg(edit_stack, client, init_png):
    gray = Image.new("L", (64, 64), 0)
    gray.paste(255, BOX)                              # white = repaint
    buf = io.BytesIO()
    gray.save(buf, format="PNG")
    res = client.images.edit(image=("init.png", init_png, "image/png"), mask=("m.png", buf.getvalue(), "image/png"),
                             prompt="a green triangle", response_format="url", output_format="jpeg",
                             extra_body={"seed": 3, "output_compression": 80, **FAST})
    url = res.data[0].url
    got = httpx.get(url, timeout=30)
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(got.content))
    assert im.format == "JPEG" and im.size == (64, 64) and b'"strength": 1.0' in got.content
    with httpx.Client(base_url=edit_stack["api"].url, headers={"Authorization": f"Bearer {BOB}"}) as bob:
        job_id = url.split("/v1/jobs/")[1].split("/")[0]
        assert bob.get(f"/v1/jobs/{job_id}").status_code == 404
        assert bob.get(f"/v1/jobs/{job_id}/images/0").status_code == 404


def test_img2img_job_and_webp_generation(edit_stack, init_png):
    from devkit.api_proc import wait_job

    with edit_stack["api"].client(ALICE) as c:
        job = c.post("/v1/jobs", json={"prompt": "a red circle on a black background", "strength": 0.6,
                                       "image": base64.b64encode(init_png).decode(), "seed": 4, **FAST})
        assert job.status_code == 202, job.text
        done = wait_job(c, job.json()["id"], timeout=120)
        assert done["status"] == "succeeded" and done["kind"] == "img2img", done
        assert done["progress"] == {"step": 7, "total": 7, "parked": False}   # int(12 x 0.6)
        assert not edit_stack["redis"].client().exists(f"latentd:init:{done['id']}")
        gen = c.post("/v1/images/generations", json={"prompt": "a red circle", "size": "64x64",
                                                     "output_format": "webp", "seed": 5, **FAST})
        assert gen.status_code == 200, gen.text
        img = c.get(gen.json()["data"][0]["url"].split(edit_stack["api"].url)[1])
        assert img.headers["content-type"] == "image/webp"
        assert Image.open(io.BytesIO(img.content)).format == "WEBP"
