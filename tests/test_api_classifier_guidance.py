"""Classifier guidance through the service: real redis-server, uvicorn and `latentd worker` on the
bundled model (it ships a classifier): /v1/models lists the classifier's attributes and labels,
a guided request succeeds and differs from the unguided one of the same seed, bad labels and a
model without a classifier answer 422 naming the field, and nothing is queued for them."""
from __future__ import annotations

import base64

import pytest

from devkit.api_proc import ALICE, service_stack

MODEL = str(__import__("pathlib").Path(__file__).resolve().parent.parent / "models" / "shapes")
BODY = {"prompt": "", "steps": 4, "guidance_scale": 1.0, "seed": 5, "response_format": "b64_json",
        "size": "64x64"}


@pytest.fixture(scope="module")
def stack():
    with service_stack(MODEL) as s:
        yield s["api"]


def test_models_list_the_classifier(stack):
    with stack.client(ALICE) as c:
        info = c.get("/v1/models").json()["data"][0]["info"]
    assert info["classifier"]["shape"] == ["circle", "square", "triangle"]
    assert "red" in info["classifier"]["color"] and "gray" in info["classifier"]["background"]


def test_guided_generation_runs_and_changes_the_image(stack):
    with stack.client(ALICE) as c:
        # an empty prompt needs classifier_guidance; at scale 0 it steers nothing
        plain = c.post("/v1/images/generations", json={**BODY, "classifier_guidance": {"color": "blue", "scale": 0}})
        assert c.post("/v1/images/generations", json=BODY).json()["error"]["field"] == "prompt"
        guided = c.post("/v1/images/generations",
                        json={**BODY, "classifier_guidance": {"color": "blue", "shape": "square", "scale": 5}})
        assert plain.status_code == 200 and guided.status_code == 200, guided.text
        a, b = (base64.b64decode(r.json()["data"][0]["b64_json"]) for r in (plain, guided))
        assert a[:8] == b[:8] == b"\x89PNG\r\n\x1a\n" and a != b
        job = c.post("/v1/jobs", json={**BODY, "classifier_guidance": {"background": "black"}})
        assert job.status_code == 202
        assert c.get(f"/v1/jobs/{job.json()['id']}").json()["params"]["classifier_targets"] == [["background", "black"]]


@pytest.mark.parametrize("value,field", [
    ({"color": "pink"}, "classifier_guidance.color"),
    ({"size": "big"}, "classifier_guidance"),
    ({"color": "red", "scale": 1000}, "classifier_guidance.scale"),
    ({"scale": 2}, "classifier_guidance"),
])
def test_bad_targets_are_422_naming_the_field(stack, value, field):
    with stack.client(ALICE) as c:
        before = len(c.get("/v1/jobs").json()["data"])
        r = c.post("/v1/images/generations", json={**BODY, "classifier_guidance": value})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["field"] == field and err["allowed"] is not None
        assert len(c.get("/v1/jobs").json()["data"]) == before          # nothing queued
