"""AUTOMATIC1111's API (/sdapi/v1) end to end: real redis-server, real uvicorn API, a real
worker on the tiny model, driven by the `webuiapi` client and by the exact calls Open WebUI makes.

One module-scoped stack; two models in the deployment (the tiny model under its own name, which
the worker serves, and `other` on the same folder, with no worker) so that setting one key's
default model can be seen not to touch another key's.
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import pytest
import webuiapi
from PIL import Image

from devkit.api_proc import ALICE, BOB, open_png, service_stack
from devkit.services import FAST
from latentd.jobs import keys
from latentd.jobs.models import name_of

TINY = {"steps": 2, "width": 64, "height": 64, "cfg_scale": 5.0}


def basic(key: str, user: str = "anyone") -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


@pytest.fixture(scope="module")
def stack(tiny_model):
    name = name_of(str(tiny_model))
    with service_stack(tiny_model, {"models": f"{name}={tiny_model},other={tiny_model}"}, **FAST) as s:
        s["model"] = name
        yield s


@pytest.fixture
def api(stack):
    return webuiapi.WebUIApi(baseurl=stack["api"].url + "/sdapi/v1", username="me", password=ALICE)


def b64png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_webuiapi_txt2img_basic_auth_seeds_and_info(api, stack):
    r = api.txt2img(prompt="a red square", seed=7, batch_size=2, sampler_name="Euler", **TINY)
    assert [im.size for im in r.images] == [(64, 64), (64, 64)]
    assert r.info["all_seeds"] == [7, 8] and r.info["seed"] == 7
    assert r.info["sd_model_name"] == stack["model"] and r.info["sampler_name"] == "Euler"
    assert r.info["infotexts"][1].startswith("a red square\nSteps: 2, Sampler: Euler, Schedule type: "
                                             "Automatic, CFG scale: 5.0, Seed: 8, Size: 64x64")
    assert r.parameters["seed"] == 7 and r.parameters["width"] == 64
    # a random seed (-1) is reported
    r = api.txt2img(prompt="a red square", seed=-1, sampler_name="Euler a", scheduler="Karras", **TINY)
    assert r.info["seed"] >= 0 and r.parameters["seed"] == r.info["seed"]
    assert r.parameters["scheduler"] == "Karras"


def test_unauthenticated_gets_a1111_401(stack):
    url = stack["api"].url + "/sdapi/v1"
    for headers in ({}, {"Authorization": ""}, basic("ltd_wrong"), {"Authorization": "Basic %%%"}):
        resp = httpx.post(url + "/txt2img", json={"prompt": "x"}, headers=headers)
        assert resp.status_code == 401, (headers, resp.text)
        assert resp.json() == {"detail": "Not authenticated"}
        assert resp.headers["www-authenticate"] == "Basic"
    with pytest.raises(RuntimeError, match="401"):
        webuiapi.WebUIApi(baseurl=url).txt2img(prompt="x", **TINY)
    # Basic works on the /v1 routes too (the password is the key)
    assert httpx.get(stack["api"].url + "/v1/models", headers=basic(ALICE)).status_code == 200


def test_same_seed_same_pixels_as_v1(stack):
    api = stack["api"]
    with api.client(ALICE) as c:
        a = c.post("/sdapi/v1/txt2img", json={"prompt": "a blue circle", "seed": 11, "sampler_name": "DPM++ 2M",
                                               "scheduler": "Karras", **TINY})
        b = c.post("/v1/images/generations", json={
            "prompt": "a blue circle", "seed": 11, "sampler": "dpmpp_2m", "karras": True, "steps": 2,
            "size": "64x64", "guidance_scale": 5.0, "response_format": "b64_json"})
        legacy = c.post("/sdapi/v1/txt2img", json={"prompt": "a blue circle", "seed": 11,
                                                    "sampler_name": "DPM++ 2M Karras", **TINY})
    assert a.status_code == b.status_code == legacy.status_code == 200, (a.text, b.text, legacy.text)
    pix = [open_png(base64.b64decode(x)).convert("RGB").tobytes()
           for x in (a.json()["images"][0], b.json()["data"][0]["b64_json"], legacy.json()["images"][0])]
    assert pix[0] == pix[1] == pix[2]


def test_webuiapi_img2img_with_mask(api):
    init = Image.new("RGB", (64, 64), (200, 10, 10))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 24, 64))                      # repaint the left part
    r = api.img2img(images=[init], mask_image=mask, inpaint_full_res=False, inpainting_fill=1,
                    denoising_strength=0.8, prompt="a green circle", seed=3, sampler_name="Euler", **TINY)
    out = r.images[0].convert("RGB")
    assert out.size == (64, 64) and r.info["denoising_strength"] == 0.8
    assert all(abs(a - b) <= 3 for a, b in zip(out.getpixel((60, 32)), (200, 10, 10)))   # kept
    assert r.parameters["init_images"] is None
    # fill (webuiapi's default), an inverted mask, no blur; a mask sent with transparency
    r = api.img2img(images=[init], mask_image=mask, inpaint_full_res=False, inpainting_mask_invert=1,
                    mask_blur=0, prompt="a green circle", seed=3, **TINY)
    assert all(abs(a - b) <= 3 for a, b in zip(r.images[0].convert("RGB").getpixel((2, 32)), (200, 10, 10)))


def test_webuiapi_img2img_only_masked(api):
    """webuiapi's default inpaint_full_res=True: the masked region, grown by the padding and to
    the output's aspect, is inpainted at the full output size and pasted back; outside the mask
    the init image's pixels stay."""
    init = Image.new("RGB", (64, 64), (200, 10, 10))
    init.paste((10, 10, 200), (32, 0, 64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 20, 20))                       # a small square to repaint
    r = api.img2img(images=[init], mask_image=mask, inpaint_full_res_padding=4, mask_blur=0,
                    inpainting_fill=1, prompt="a green circle", seed=5, **TINY)
    out = r.images[0].convert("RGB")
    assert out.size == (64, 64)
    assert out.getpixel((2, 40)) == (200, 10, 10) and out.getpixel((60, 40)) == (10, 10, 200)   # untouched
    inside = [out.getpixel((x, y)) for x in range(8, 20) for y in range(8, 20)]
    assert any(p != (200, 10, 10) for p in inside)        # the masked square was redrawn


def test_only_masked_crop_geometry():
    from latentd.app.a1111 import only_masked

    sharp = Image.new("L", (64, 64), 0)
    sharp.paste(255, (8, 8, 20, 20))
    assert only_masked.region(sharp, 4) == (4, 4, 24, 24)                 # grown by the padding
    assert only_masked.region(Image.new("L", (8, 8), 0), 4) is None       # nothing to repaint
    # a 20x20 region for a 64x32 output: widened to 40x20, shifted back inside the image
    assert only_masked.fit_aspect((4, 4, 24, 24), 64, 32, 64, 64) == (0, 4, 40, 24)
    # a 10x60 region for a 64x32 output: as wide as the image allows
    assert only_masked.fit_aspect((0, 0, 10, 60), 64, 32, 64, 64) == (0, 0, 64, 60)


def test_models_options_per_key(stack, api):
    name = stack["model"]
    assert sorted(m["title"] for m in api.get_sd_models()) == sorted([name, "other"])
    bob = webuiapi.WebUIApi(baseurl=stack["api"].url + "/sdapi/v1", username="b", password=BOB)
    try:
        api.util_set_model("other")
        assert api.util_get_current_model() == "other"
        assert bob.util_get_current_model() == name            # another key's default is untouched
        with stack["api"].client(ALICE) as c:
            assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}).status_code == 422
            bad = c.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
            assert bad.status_code == 422 and bad.json()["error"]["field"] == "CLIP_stop_at_last_layers"
    finally:
        api.util_set_model(name)
    assert api.get_options()["sd_model_checkpoint"] == name
    assert api.get_cmd_flags()["api"] is True


def test_lists(api):
    names = [s["name"] for s in api.get_samplers()]
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM"} <= set(names)
    assert {s["label"] for s in api.get_schedulers()} == {"Automatic", "Karras"}
    assert api.get_loras() == [] and api.get_upscalers() == []


def test_progress_preview_and_interrupt(stack, api):
    done: dict = {}
    slow = dict(TINY, steps=150, width=128, height=128)
    t = threading.Thread(target=lambda: done.setdefault(
        "r", api.txt2img(prompt="a yellow triangle", seed=5, batch_size=4, sampler_name="Euler", **slow)))
    t.start()
    seen = None
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and t.is_alive():
            p = api.get_progress()
            if p["progress"] > 0 and p["current_image"]:
                seen = p
                break
            time.sleep(0.05)
        assert seen is not None, "no progress with a preview while the job ran"
        assert 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 150 * 4
        assert open_png(base64.b64decode(seen["current_image"]))
        bob = webuiapi.WebUIApi(baseurl=stack["api"].url + "/sdapi/v1", username="b", password=BOB)
        assert bob.get_progress()["state"]["job_count"] == 0       # another key sees nothing
        assert api.interrupt() == {}
    finally:
        t.join(120)
    r = done["r"]                       # answered 200 with the images done before the interrupt
    assert len(r.images) < 4
    assert api.get_progress()["state"]["job_count"] == 0


def test_open_webui_calls(stack):
    """The calls Open WebUI's AUTOMATIC1111 backend makes (backend/open_webui/routers/images.py):
    1. GET  /sdapi/v1/options    (verify_url; get_image_model reads sd_model_checkpoint)
    2. GET  /sdapi/v1/sd-models  (get_models: title -> id, model_name -> name)
    3. POST /sdapi/v1/options    (set_image_model: the GET dict back with sd_model_checkpoint)
    4. POST /sdapi/v1/txt2img    {prompt, batch_size, width, height[, steps][, negative_prompt]}
       and reads res["images"] (base64) and res["info"]
    each with `authorization: Basic base64(user:password)`, or an empty header without auth."""
    h = basic(ALICE, "webui")
    with httpx.Client(base_url=stack["api"].url, headers=h, timeout=60) as c:
        options = c.get("/sdapi/v1/options").json()
        models = c.get("/sdapi/v1/sd-models").json()
        assert {"title", "model_name"} <= set(models[0]) and options["sd_model_checkpoint"] == stack["model"]
        options["sd_model_checkpoint"] = models[0]["title"]
        assert c.post("/sdapi/v1/options", json=options).status_code == 200
        res = c.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "batch_size": 1, "width": 64, "height": 64,
                                                 "steps": 2, "negative_prompt": "blurry"})
        assert res.status_code == 200, res.text
        body = res.json()
        assert open_png(base64.b64decode(body["images"][0])).size == (64, 64)
        assert json.loads(body["info"])["infotexts"][0].startswith("a cat\nNegative prompt: blurry\n")
    assert httpx.get(stack["api"].url + "/sdapi/v1/options", headers={"authorization": ""}).status_code == 401


def test_png_info_reads_latentd_and_a1111_chunks(stack, api):
    r = api.txt2img(prompt="a red square", seed=21, **TINY)
    info = api.png_info(r.images[0]).json
    assert info["parameters"]["Seed"] == "21" and info["parameters"]["Size-1"] == "64"
    assert json.loads(info["items"]["latentd"])["seed"] == 21


@pytest.mark.parametrize("body, field", [
    ({"sampler_name": "Heun"}, "sampler_name"),
    ({"scheduler": "exponential"}, "scheduler"),
    ({"sampler_name": "DDIM", "scheduler": "Karras"}, "scheduler"),
    ({"enable_hr": True}, "enable_hr"),
    ({"restore_faces": True}, "restore_faces"),
    ({"tiling": True}, "tiling"),
    ({"alwayson_scripts": {"ControlNet": {"args": [{}]}}}, "alwayson_scripts.ControlNet"),
    ({"script_name": "x/y/z plot"}, "script_name"),
    ({"subseed_strength": 0.5}, "subseed_strength"),
    ({"prompt": "a cat <lora:papercut:0.8>"}, "prompt"),
    ({"width": 100}, "width"),
    ({"batch_size": 9, "n_iter": 2}, "batch_size"),
    ({"override_settings": {"sd_model_checkpoint": "nope"}}, "override_settings.sd_model_checkpoint"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings.CLIP_stop_at_last_layers"),
    ({"sampler_name": "Euler a", "eta": 0.5}, "eta"),
    ({"cfg_scale": 1000}, "cfg_scale"),
    ({"no_such_field": 1}, "no_such_field"),
])
def test_refusals_name_the_field_and_queue_nothing(stack, body, field):
    r = stack["redis"].client()
    before = len(r.keys(keys.job("*")))
    with stack["api"].client(ALICE) as c:
        resp = c.post("/sdapi/v1/txt2img", json={"prompt": "a cat", **TINY, **body})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == field and field.split(".")[0] in resp.json()["detail"]
    assert len(r.keys(keys.job("*"))) == before
    if field == "sampler_name":
        assert "Euler a" in resp.json()["error"]["allowed"]
    if field == "prompt":
        assert "papercut" in resp.json()["detail"]


@pytest.mark.parametrize("body, field", [
    ({"init_images": ["not base64!"]}, "init_images"),
    ({"init_images": [base64.b64encode(b"not an image").decode()]}, "init_images"),
    ({"init_images": []}, "init_images"),
    ({"mask": "@@@"}, "mask"),
    ({"mask": "x", "inpainting_fill": 2, "inpaint_full_res": False}, "inpainting_fill"),
    ({"resize_mode": 1}, "resize_mode"),
])
def test_img2img_bad_input(stack, body, field):
    r = stack["redis"].client()
    before = len(r.keys(keys.job("*")))
    ok = "data:image/png;base64," + b64png(Image.new("RGB", (64, 64)))
    with stack["api"].client(ALICE) as c:
        resp = c.post("/sdapi/v1/img2img", json={"prompt": "a cat", **TINY, "init_images": [ok], **body})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == field
    assert len(r.keys(keys.job("*"))) == before


def test_playground_snippet_names_match_the_translation():
    """The playground shows the /sdapi equivalent of its request with A1111's sampler names; its
    copy of the names is app/a1111/names.py's."""
    import re

    from devkit.services import ROOT
    from latentd.app.a1111 import names

    js = (ROOT / "app" / "static" / "app.js").read_text()
    table = json.loads(re.search(r"const A1111_SAMPLERS = (\{.*?\});", js).group(1))
    assert table == {s.sampler: s.name for s in names.SAMPLERS if not s.karras}
    assert 'id="sdapi-snippet"' in (ROOT / "app" / "static" / "index.html").read_text()
