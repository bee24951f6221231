"""One request, every surface, through a real service (redis-server, uvicorn API, `latentd
worker`) on the bundled model, which ships a classifier:

- `latentd generate --server` sends --init-image, --mask, --strength, --classify and
  --classifier-scale (the body is derived from the declaration: nothing is dropped) and draws
  the same image, bit for bit, as `latentd generate` on the local engine;
- the multipart edit form takes classifier_guidance as a JSON object string;
- POST /v1/jobs refuses `stream` and `partial_images` with a 422 naming the field;
- the OpenAI event stream reports the output_format that was asked, and sends bytes in it."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from devkit.api_proc import ALICE, service_stack, wait_job
from devkit.services import ROOT
from tests.sse_client import iter_events

MODEL = Path(__file__).resolve().parent.parent / "models" / "shapes"
pytestmark = pytest.mark.skipif(not (MODEL / "model_index.json").is_file(),
                                reason="models/shapes/ not trained yet")
FAST = {"steps": 8, "sampler": "dpmpp_2m", "seed": 4}


@pytest.fixture(scope="module")
def stack():
    with service_stack(MODEL) as s:
        yield s


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def init_and_mask() -> tuple[bytes, bytes]:
    im = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(im).ellipse((12, 12, 52, 52), fill="red")
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (8, 8, 40, 40))          # transparent = repaint (OpenAI's rule)
    return _png(im), _png(mask)


def test_cli_server_sends_every_edit_flag_and_matches_local(stack, tmp_path):
    image, mask = init_and_mask()
    (tmp_path / "init.png").write_bytes(image)
    (tmp_path / "mask.png").write_bytes(mask)
    flags = ["a blue square on a black background", "--init-image", str(tmp_path / "init.png"),
             "--mask", str(tmp_path / "mask.png"), "--strength", "0.75", "--classify",
             "color=blue,shape=square", "--classifier-scale", "3", "--steps", "8", "--seed", "4",
             "--sampler", "dpmpp_2m"]
    env = dict(stack["worker"].env, LATENTD_API_KEY=ALICE)
    base = [sys.executable, "-m", "latentd.cli", "generate"]
    local = subprocess.run(base + flags + ["--model", str(MODEL), "--out", str(tmp_path / "local.png")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr
    remote = subprocess.run(base + flags + ["--server", stack["api"].url, "--out", str(tmp_path / "remote.png")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert remote.returncode == 0, remote.stderr
    with stack["api"].client(ALICE) as c:
        job = c.get("/v1/jobs?limit=1").json()["data"][0]
    p = job["params"]
    assert (p["kind"], p["strength"], p["classifier_scale"]) == ("inpaint", 0.75, 3.0)
    assert p["classifier_targets"] == [["color", "blue"], ["shape", "square"]]
    a, b = (np.asarray(Image.open(tmp_path / f).convert("RGB")) for f in ("local.png", "remote.png"))
    assert np.array_equal(a, b)
    plain = subprocess.run(base + flags[:1] + ["--steps", "8", "--seed", "4", "--model", str(MODEL),
                                               "--out", str(tmp_path / "plain.png")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and not np.array_equal(a, np.asarray(Image.open(tmp_path / "plain.png")))


def test_edit_form_takes_classifier_guidance(stack):
    image, _ = init_and_mask()
    form = {"prompt": "a shape", "size": "64x64", "strength": "0.6", "response_format": "b64_json",
            **{k: str(v) for k, v in FAST.items()}}
    files = {"image": ("init.png", image, "image/png")}
    with stack["api"].client(ALICE) as c:
        guided = c.post("/v1/images/edits", data={**form, "classifier_guidance": json.dumps(
            {"color": "green", "scale": 4})}, files=files, timeout=120)
        assert guided.status_code == 200, guided.text
        job = c.post("/v1/jobs", data={**form, "classifier_guidance": '{"shape": "triangle"}'}, files=files)
        assert job.status_code == 202, job.text
        done = wait_job(c, job.json()["id"])
        assert done["params"]["classifier_targets"] == [["shape", "triangle"]]
        for bad, field in (('{"color": "pink"}', "classifier_guidance.color"), ("red", "classifier_guidance")):
            r = c.post("/v1/images/edits", data={**form, "classifier_guidance": bad}, files=files)
            assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text


@pytest.mark.parametrize("field,value", [("stream", True), ("partial_images", 1)])
def test_jobs_refuse_stream_fields(stack, field, value):
    with stack["api"].client(ALICE) as c:
        r = c.post("/v1/jobs", json={"prompt": "a circle", field: value})
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
        assert "/v1/images/generations" in r.json()["error"]["message"]


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_stream_events_report_the_asked_output_format(stack, fmt):
    body = {"prompt": "a red circle", "size": "64x64", "stream": True, "partial_images": 2,
            "output_format": fmt, **FAST}
    with stack["api"].client(ALICE) as c:
        with c.stream("POST", "/v1/images/generations", json=body, timeout=120) as resp:
            assert resp.status_code == 200
            events = list(iter_events(resp))
    images = [e for e in events if e.type.startswith("image_generation.")]
    assert images and images[-1].type == "image_generation.completed"
    for e in images:
        assert e.data["output_format"] == fmt
        assert Image.open(io.BytesIO(base64.b64decode(e.data["b64_json"]))).format == fmt.upper()
