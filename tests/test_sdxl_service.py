"""SDXL in the service: a deployment of the bundled model (`shapes`, the default), the tiny random
SDXL (`xl`, served) and SDXL's real configs at native 1024 without weights (`xl1024`, nobody
serves it: the API validates against its folder). Real redis-server, real uvicorn, one real
`latentd worker --model shapes --model xl=PATH`, the official `openai` client."""
from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import openai
import pytest
from PIL import Image

from devkit.api_proc import ALICE, models_stack
from latentd.model.family import SDXL_SIZES
from latentd.model.info import BUNDLED
from tests.test_edits_engine import init_image, mask_image

FAST = {"steps": 3, "sampler": "euler", "seed": 3}
BUCKETS = [f"{w}x{h}" for w, h in SDXL_SIZES]


@pytest.fixture(scope="module")
def xl1024(tiny_sdxl, tmp_path_factory):
    """SDXL's configs at native 1024 (unet sample_size 128), no weights."""
    folder = tmp_path_factory.mktemp("xl1024") / "xl1024"
    shutil.copytree(tiny_sdxl, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "sample_size": 128}))
    return folder


@pytest.fixture(scope="module")
def stack(tiny_sdxl, xl1024):
    models = f"shapes={BUNDLED},xl={tiny_sdxl},xl1024={xl1024}"
    with models_stack(models, ("shapes", f"xl={tiny_sdxl}"), unserved=("xl1024",)) as stack:
        yield stack


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack["api"].url + "/v1", api_key=ALICE, max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def engine(tiny_sdxl):
    from latentd.model.pipeline import load_pipeline

    return load_pipeline(tiny_sdxl, safety=False)


def decode(b64: str) -> tuple[str, Image.Image]:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    return json.loads(img.text["latentd"])["model"], img


def same(got: Image.Image, want: Image.Image, what: str) -> None:
    diff = int(np.abs(np.asarray(got.convert("RGB"), np.int16) - np.asarray(want, np.int16)).max())
    print(f"{what}: service vs engine, max pixel diff {diff}/255")
    assert got.size == want.size and diff == 0, what


def test_both_models_answer_by_model(client, engine):
    from latentd.model.pipeline import GenerationRequest

    res = client.images.generate(prompt="a red cat", model="xl", size="64x32", response_format="b64_json",
                                 extra_body=FAST)
    model, img = decode(res.data[0].b64_json)
    assert model == "xl" and img.size == (64, 32)
    want = engine.generate([GenerationRequest("a red cat", steps=3, sampler="euler", seed=3, width=64, height=32)])
    same(img, want[0].image, "sdxl text-to-image")
    for kw in ({"model": "shapes"}, {}):                    # the default is the bundled model
        res = client.images.generate(prompt="a red circle", size="64x64", response_format="b64_json",
                                     extra_body=FAST, **kw)
        assert decode(res.data[0].b64_json)[0] == "shapes"


def test_sdxl_inpainting_through_the_openai_client(client, engine):
    from latentd.model.pipeline import GenerationRequest

    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()
    res = client.images.edit(image=("init.png", png(init_image()), "image/png"),
                             mask=("mask.png", png(mask_image()), "image/png"), prompt="a red cat", model="xl",
                             response_format="b64_json", extra_body={**FAST, "strength": 1.0})
    model, img = decode(res.data[0].b64_json)
    assert model == "xl" and img.size == (64, 64)
    want = engine.generate([GenerationRequest("a red cat", steps=3, sampler="euler", seed=3, init_image=init_image(),
                                              mask=mask_image(), strength=1.0)])
    same(img, want[0].image, "sdxl inpaint")


def test_a_size_outside_the_buckets_is_a_422_naming_size(client, stack):
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.generate(prompt="x", model="xl1024", size="1024x768")
    body = e.value.body
    err = body if "field" in (body or {}) else body["error"]
    print(err)
    assert err["field"] == "size" and err["allowed"] == BUCKETS and "1216x832" in err["message"]
    with stack["api"].client(ALICE) as c:                   # a bucket is accepted (queued: nobody serves it)
        r = c.post("/v1/jobs", json={"prompt": "x", "model": "xl1024", "size": "1216x832", "steps": 2})
        assert r.status_code in (200, 201, 202), r.text
        assert c.delete(f"/v1/jobs/{r.json()['id']}").json()["status"] == "canceled"
        info = {m["id"]: m["info"] for m in c.get("/v1/models").json()["data"]}
    assert info["xl"]["family"] == info["xl1024"]["family"] == "sdxl" and info["shapes"]["family"] == "sd"
    assert info["xl1024"]["sizes"] == [list(s) for s in SDXL_SIZES]
