"""OpenAI's remaining image fields through a real stack (redis-server, uvicorn API, `latentd
worker` on a tiny model whose real safety checker flags every image, so moderation is seen on
every job): `quality` presets (steps, /v1/models), `background`, `moderation` with the per-key
permission of the keys file (`latentd keys create --allow-moderation-low`), `input_fidelity` on
edits, and the answer's size / quality / background / output_format / usage through the official
`openai` client, synchronous and streamed."""
from __future__ import annotations

import argparse
import base64
import contextlib
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from devkit.api_proc import ALICE, BOB, open_png, service_stack, wait_job
from tests.test_security import flag_everything

FAST = {"size": "64x64", "sampler": "euler", "seed": 5}
POSITIONS = 8 * 8                      # a 64x64 image's latent positions (VAE factor 8)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(open_png(data).convert("RGB"))


def _create_key(path, *flags) -> str:
    """`latentd keys create` as the CLI runs it; the key it prints."""
    from latentd import cmd_keys

    p = argparse.ArgumentParser()
    cmd_keys.add_arguments(p)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cmd_keys.run(p.parse_args(["create", *flags, "--file", str(path)])) == 0
    return out.getvalue().split()[0]


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("oa")
    model = flag_everything(tiny_model, folder / "model")
    keys_file = folder / "keys.json"
    carol = _create_key(keys_file, "carol", "--allow-moderation-low")
    dave = _create_key(keys_file, "dave")
    with service_stack(model, api_settings={"keys_file": keys_file}) as st:
        yield {**st, "model": model, "carol": carol, "dave": dave, "keys_file": keys_file}


def _client(stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["api"].url + "/v1", api_key=key, max_retries=0)


def test_keys_file_keeps_permissions(stack):
    from latentd.app.auth import read_keys_file, read_permissions

    assert set(read_keys_file(str(stack["keys_file"]))) == {"carol", "dave"}
    assert read_permissions(str(stack["keys_file"])) == {"carol": frozenset({"moderation_low"})}


def test_quality_presets_set_the_steps_and_show_in_models(stack):
    api = stack["api"]
    with api.client(ALICE) as alice:
        info = alice.get("/v1/models").json()["data"][0]["info"]
        presets = info["quality_steps"]
        d = info["default_steps"]
        assert presets == {"low": (d + 1) // 2, "medium": d, "high": (3 * d + 1) // 2}
        want = {"low": ("low", presets["low"]), "high": ("high", presets["high"]),
                "hd": ("high", presets["high"]), "standard": ("medium", d), "auto": ("medium", d),
                None: ("medium", d)}
        ids = {}
        for q in want:
            body = {"prompt": "a red circle", **FAST, **({"quality": q} if q else {})}
            ids[q] = alice.post("/v1/jobs", json=body).json()["id"]
        # an explicit steps wins; the job reports the preset nearest to it
        ids["steps"] = alice.post("/v1/jobs", json={"prompt": "x", "quality": "high", "steps": 2,
                                                    **FAST}).json()["id"]
        want["steps"] = ("low", 2)
        for q, jid in ids.items():
            job = wait_job(alice, jid)
            assert job["status"] == "succeeded", job
            assert (job["params"]["quality"], job["params"]["steps"]) == want[q], q
            assert job["progress"]["total"] == want[q][1]


def test_unknown_values_and_transparent_are_422s_naming_the_field(stack):
    api = stack["api"]
    with api.client(ALICE) as alice:
        for field, value, allowed in (("quality", "ultra", "hd"), ("background", "clear", "opaque"),
                                      ("moderation", "none", "low")):
            r = alice.post("/v1/images/generations", json={"prompt": "x", field: value, **FAST})
            assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
            assert allowed in str(r.json()["error"]["allowed"])
        r = alice.post("/v1/jobs", json={"prompt": "x", "input_fidelity": "high", **FAST})
        assert r.status_code == 422 and r.json()["error"]["field"] == "input_fidelity"
        r = alice.post("/v1/images/edits", data={"prompt": "x", "input_fidelity": "exact"},
                       files={"image": ("i.png", _png(), "image/png")})
        assert r.status_code == 422 and r.json()["error"]["field"] == "input_fidelity", r.text
    with pytest.raises(openai.UnprocessableEntityError) as e:
        _client(stack, ALICE).images.generate(prompt="x", background="transparent", size="64x64")
    err = e.value.body
    assert err["field"] == "background" and "alpha" in err["message"]
    assert err["allowed"] == ["opaque", "auto"]


def test_moderation_low_only_for_a_permitted_key(stack):
    api = stack["api"]
    for key in (BOB, stack["dave"]):
        with pytest.raises(openai.PermissionDeniedError) as e:
            _client(stack, key).images.generate(prompt="x", moderation="low", size="64x64")
        assert e.value.status_code == 403 and e.value.body["field"] == "moderation"
        with api.client(key) as c:         # the edit form and the job API refuse it the same way
            r = c.post("/v1/images/edits", data={"prompt": "x", "moderation": "low"},
                       files={"image": ("i.png", _png(), "image/png")})
            assert r.status_code == 403 and r.json()["error"]["field"] == "moderation"
            assert c.post("/v1/jobs", json={"prompt": "x", "moderation": "low", **FAST}).status_code == 403
    carol = _client(stack, stack["carol"])
    body = dict(prompt="a red circle", size="64x64", response_format="b64_json",
                extra_body={"steps": 2, "sampler": "euler", "seed": 5})
    low = carol.images.generate(moderation="low", **body)
    auto = carol.images.generate(moderation="auto", **body)
    for res, black in ((low, False), (auto, True)):
        im = res.data[0]
        assert im.model_extra["nsfw"] is True
        assert bool(_pixels(base64.b64decode(im.b64_json)).max() == 0) is black
    # what is stored and served for the low job is the unredacted image, for its owner only
    with api.client(stack["carol"]) as c:
        job = wait_job(c, c.post("/v1/jobs", json={"prompt": "a red circle", "moderation": "low",
                                                   "steps": 2, **FAST}).json()["id"])
        assert job["params"]["moderation"] == "low" and job["images"][0]["nsfw"] is True
        stored = stack["redis"].client().get(f"latentd:img:{job['id']}:0")
        assert np.array_equal(_pixels(stored), _pixels(base64.b64decode(low.data[0].b64_json)))
        assert _pixels(httpx.get(job["images"][0]["url"]).content).max() > 0


def test_answer_fields_and_usage_through_the_openai_client(stack):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(stack["model"] / "tokenizer"))
    prompt, negative = "a green triangle on a gray background", "blurry"
    text_tokens = len(tok(prompt).input_ids) + len(tok(negative).input_ids)
    client = _client(stack, ALICE)
    res = client.images.generate(prompt=prompt, size="64x64", quality="low", output_format="jpeg",
                                 n=2, response_format="b64_json",
                                 extra_body={"negative_prompt": negative, "sampler": "euler"})
    low = client.models.list().data[0].model_extra["info"]["quality_steps"]["low"]
    assert (res.size, res.quality, res.background, res.output_format) == ("64x64", "low", "opaque", "jpeg")
    u = res.usage
    assert u.input_tokens_details.text_tokens == text_tokens and u.input_tokens_details.image_tokens == 0
    assert u.input_tokens == text_tokens and u.output_tokens == 2 * POSITIONS * low
    assert u.total_tokens == u.input_tokens + u.output_tokens and u.model_extra["compute_seconds"] > 0
    events = list(client.images.generate(prompt=prompt, size="64x64", stream=True, partial_images=1,
                                         quality="low", extra_body={"negative_prompt": negative,
                                                                    "sampler": "euler"}))
    assert [e.type for e in events][-1] == "image_generation.completed"
    for e in events:
        assert (e.size, e.quality, e.background, e.output_format) == ("64x64", "low", "opaque", "png")
    done = events[-1].usage
    assert done.input_tokens == text_tokens and done.output_tokens == POSITIONS * low
    assert done.total_tokens == text_tokens + POSITIONS * low


def _png(color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="PNG")
    return buf.getvalue()


def test_input_fidelity_sets_an_edits_default_strength(stack):
    api = stack["api"]
    image = base64.b64encode(_png()).decode()
    with api.client(ALICE) as alice:
        cases = {("high", None): 0.5, ("low", None): 0.9, (None, None): 0.8, ("high", 0.3): 0.3}
        ids = {}
        for (fid, strength), _ in cases.items():
            body = {"prompt": "a blue square", "image": image, "steps": 4, **FAST}
            body.update({k: v for k, v in (("input_fidelity", fid), ("strength", strength)) if v})
            ids[fid, strength] = alice.post("/v1/jobs", json=body).json()["id"]
        for case, jid in ids.items():
            job = wait_job(alice, jid)
            assert job["status"] == "succeeded" and job["params"]["strength"] == cases[case], case
    res = _client(stack, ALICE).images.edit(image=("i.png", _png(), "image/png"), prompt="a blue square",
                                            input_fidelity="high", response_format="b64_json",
                                            extra_body={"steps": 4, "sampler": "euler", "seed": 5})
    # the edit's usage counts the init image as latent positions, and the steps it ran (4 x 0.5)
    assert res.usage.input_tokens_details.image_tokens == POSITIONS
    assert res.usage.output_tokens == POSITIONS * 2 and res.size == "64x64"
