"""Few-step sampling and step caching through a real service (redis-server, uvicorn API, `latentd
worker`) on the bundled model, with small adapters in a LATENTD_LORA_DIR made here (one whose
metadata says it is meant for lcm and tcd, one that says nothing):

- lcm with the few-step adapter at guidance 1, cache_interval 3 and trailing spacing draw what
  `latentd generate` draws locally, bit for bit (cache_interval also through `--server`); tcd
  without an eta draws what tcd with eta 0.3 draws;
- a few-step sampler without an adapter meant for it, and every bad timestep_spacing,
  cache_interval and eta, is a 422 naming the field and its allowed values, and nothing is queued;
- /v1/models lists the samplers the model takes by itself and each adapter's meant_for;
  /sdapi/v1/samplers has LCM and TCD.
The resolver's gate alone (a model distilled for lcm, the local CLI's adapters) runs without services."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from devkit.api_proc import ALICE, service_stack
from devkit.services import ROOT
from latentd.jobs import keys
from latentd.jobs.request_resolve import resolve
from latentd.model.consistency import ORIGINAL_STEPS
from latentd.model.errors import InvalidRequest, ModelLoadError
from latentd.model.info import ModelInfo, info_from_configs
from latentd.model.request import MAX_CACHE_INTERVAL, SPACINGS

MODEL = Path(__file__).resolve().parent.parent / "models" / "shapes"
trained = pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason="models/shapes/ not trained yet")
PROMPT = "a red star on a black background"
MEANT_FOR = {"samplers": ["lcm", "tcd"], "steps": [1, 8], "default_steps": 4, "guidance_scale": 1.0}
FEW = "few_step_test"                   # the adapter meant for lcm and tcd
PLAIN = "plain_test"                    # one that says nothing
LCM = {"sampler": "lcm", "steps": 4, "guidance_scale": 1.0, "seed": 5, "loras": [{"name": FEW}]}
CACHED = {"sampler": "dpmpp_2m", "steps": 6, "seed": 7}
CROSS = [f"{b}.attentions.{i}.transformer_blocks.0.attn2.{p}" for b, n in
         (("down_blocks.1", 1), ("down_blocks.2", 1), ("mid_block", 1), ("up_blocks.0", 2), ("up_blocks.1", 2))
         for i in range(n) for p in ("to_k", "to_v")]
WIDTH = {"down_blocks.1": 64, "down_blocks.2": 128, "mid_block": 128, "up_blocks.0": 128, "up_blocks.1": 64}


def _adapter(path: Path, seed: int, meta: dict | None) -> None:
    """A rank-4 PEFT LoRA of the bundled U-Net's cross-attention keys and values, with `meta` as
    its latentd metadata."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    out = {}
    for m in CROSS:
        width = WIDTH[m.split(".attentions")[0]]
        out[f"unet.{m}.lora_A.weight"] = (rng.standard_normal((4, 64)) * 0.3).astype(np.float32)
        out[f"unet.{m}.lora_B.weight"] = (rng.standard_normal((width, 4)) * 0.3).astype(np.float32)
    save_file(out, str(path), metadata={"format": "pt", **({"latentd": json.dumps(meta)} if meta else {})})


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    _adapter(d / f"{FEW}.safetensors", 1, {"base_model": "shapes", "meant_for": MEANT_FOR})
    _adapter(d / f"{PLAIN}.safetensors", 2, None)
    return d


@pytest.fixture(scope="module")
def stack(lora_dir):
    with service_stack(MODEL, {"lora_dir": lora_dir}, lora_dir=lora_dir) as s:
        yield s


def _flags(body: dict) -> list[str]:
    out = []
    for name, value in body.items():
        if name == "loras":
            out += [a for lo in value for a in ("--lora", lo["name"])]
        else:
            out += ["--guidance" if name == "guidance_scale" else "--" + name.replace("_", "-"), str(value)]
    return out


def cli_image(stack, lora_dir, tmp_path_factory, body: dict, server: bool = False) -> np.ndarray:
    """`latentd generate PROMPT ...` with the body's fields as flags: on the local engine (same
    threads as the worker), or with --server on the stack."""
    out = tmp_path_factory.mktemp("cli") / "out.png"
    where = ["--server", stack["api"].url, "--key", ALICE] if server else ["--model", str(MODEL)]
    env = dict(stack["worker"].env, LATENTD_LORA_DIR=str(lora_dir))
    p = subprocess.run([sys.executable, "-m", "latentd.cli", "generate", PROMPT, *_flags(body), *where,
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return np.asarray(Image.open(out).convert("RGB"))


def generate(c: httpx.Client, **body) -> tuple[np.ndarray, dict]:
    r = c.post("/v1/images/generations", json={"prompt": PROMPT, "response_format": "b64_json", **body},
               timeout=180)
    assert r.status_code == 200, r.text
    data = base64.b64decode(r.json()["data"][0]["b64_json"])
    params = json.loads(Image.open(io.BytesIO(data)).text["latentd"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), params


@trained
def test_lcm_with_its_adapter_matches_the_cli(stack, lora_dir, tmp_path_factory):
    with stack["api"].client(ALICE) as c:
        got, params = generate(c, **LCM)
        plain, _ = generate(c, **{**LCM, "sampler": "dpmpp_2m"})
    assert (params["sampler"], params["steps"], params["loras"]) == ("lcm", 4, [[FEW, 1.0]])
    assert np.array_equal(got, cli_image(stack, lora_dir, tmp_path_factory, LCM))
    assert not np.array_equal(got, plain)


@trained
def test_tcd_without_eta_is_tcd_at_its_default_eta(stack):
    body = {**LCM, "sampler": "tcd"}
    with stack["api"].client(ALICE) as c:
        default, params = generate(c, **body)
        explicit, _ = generate(c, **body, eta=0.3)
        other, _ = generate(c, **body, eta=1.0)
    assert params["eta"] == 0.3
    assert np.array_equal(default, explicit) and not np.array_equal(default, other)


@trained
def test_cache_interval_matches_the_cli_local_and_server(stack, lora_dir, tmp_path_factory):
    with stack["api"].client(ALICE) as c:
        got, params = generate(c, **CACHED, cache_interval=3)
        full, full_params = generate(c, **CACHED)
    assert (params["cache_interval"], full_params["cache_interval"]) == (3, 1)
    assert np.array_equal(got, cli_image(stack, lora_dir, tmp_path_factory, {**CACHED, "cache_interval": 3}))
    assert np.array_equal(got, cli_image(stack, lora_dir, tmp_path_factory, {**CACHED, "cache_interval": 3},
                                         server=True))
    assert not np.array_equal(got, full)


@trained
def test_trailing_spacing_matches_the_cli(stack, lora_dir, tmp_path_factory):
    body = {**CACHED, "sampler": "ddim", "timestep_spacing": "trailing"}
    with stack["api"].client(ALICE) as c:
        got, params = generate(c, **body)
        default, default_params = generate(c, **{**body, "timestep_spacing": None})
    assert (params["timestep_spacing"], default_params["timestep_spacing"]) == ("trailing", None)
    assert np.array_equal(got, cli_image(stack, lora_dir, tmp_path_factory, body))
    assert not np.array_equal(got, default)


@trained
def test_steps_outside_what_the_adapter_is_meant_for_still_run(stack):
    with stack["api"].client(ALICE) as c:
        r = c.post("/v1/jobs", json={"prompt": PROMPT, **LCM, "steps": 12, "guidance_scale": 2.0})
        assert r.status_code == 202, r.text


def _queued(stack) -> int:
    return len(stack["redis"].client().keys(keys.job("*")))


BAD = [
    ({"cache_interval": 0}, "cache_interval", {"min": 1, "max": MAX_CACHE_INTERVAL}),
    ({"cache_interval": MAX_CACHE_INTERVAL + 1}, "cache_interval", {"min": 1, "max": MAX_CACHE_INTERVAL}),
    ({"cache_interval": 2.5}, "cache_interval", "an integer"),
    ({"cache_interval": "3"}, "cache_interval", "an integer"),
    ({"timestep_spacing": "cosine"}, "timestep_spacing", SPACINGS),
    ({"eta": 1.5, "sampler": "ddim"}, "eta", {"min": 0, "max": 1}),
    ({"eta": -0.1, "sampler": "ddim"}, "eta", {"min": 0, "max": 1}),
    ({"eta": 0.5, "sampler": "euler"}, "eta", ["ddim", "tcd"]),
    ({**LCM, "eta": 0.5}, "eta", ["ddim", "tcd"]),
    ({**LCM, "timestep_spacing": "trailing"}, "timestep_spacing", ["ddpm", "ddim", "euler", "euler_a", "dpmpp_2m"]),
    ({**LCM, "steps": ORIGINAL_STEPS + 1}, "steps", {"min": 1, "max": ORIGINAL_STEPS}),
]


@trained
@pytest.mark.parametrize("body, field, allowed", BAD, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(BAD)])
def test_bad_sampling_fields_are_422_naming_field_and_allowed(stack, body, field, allowed):
    before = _queued(stack)
    with stack["api"].client(ALICE) as c:
        for path in ("/v1/images/generations", "/v1/jobs"):
            r = c.post(path, json={"prompt": PROMPT, **body})
            assert r.status_code == 422, r.text
            err = r.json()["error"]
            assert err["field"] == field and err["message"].startswith(field), err
            if isinstance(allowed, tuple):
                assert all(v in str(err["allowed"]) for v in allowed), err
            else:
                assert err["allowed"] == allowed, err
    assert _queued(stack) == before


@trained
@pytest.mark.parametrize("loras", [None, [{"name": PLAIN}], [{"name": FEW, "scale": 0}]])
@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
def test_a_few_step_sampler_needs_an_adapter_meant_for_it(stack, sampler, loras):
    before = _queued(stack)
    body = {"prompt": PROMPT, "sampler": sampler, "steps": 4, **({"loras": loras} if loras else {})}
    with stack["api"].client(ALICE) as c:
        for path in ("/v1/images/generations", "/v1/jobs"):
            r = c.post(path, json=body)
            assert r.status_code == 422, r.text
            err = r.json()["error"]
            assert err["field"] == "sampler" and "few-step" in err["message"] and FEW in err["message"], err
            assert "lcm" not in err["allowed"]["samplers"] and "dpmpp_2m" in err["allowed"]["samplers"]
            assert FEW in err["allowed"]["adapters"][sampler] and PLAIN not in err["allowed"]["adapters"][sampler]
    assert _queued(stack) == before


@trained
def test_edit_form_takes_the_fields_as_text(stack):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "navy").save(buf, format="PNG")
    files = {"image": ("init.png", buf.getvalue(), "image/png")}
    form = {"prompt": PROMPT, "strength": "0.75", "steps": "4", "sampler": "ddim", "seed": "3"}
    with stack["api"].client(ALICE) as c:
        r = c.post("/v1/jobs", data={**form, "cache_interval": "2", "timestep_spacing": "trailing"}, files=files)
        assert r.status_code == 202, r.text
        params = c.get(f"/v1/jobs/{r.json()['id']}").json()["params"]
        assert (params["cache_interval"], params["timestep_spacing"]) == (2, "trailing")
        for bad, field in (({"cache_interval": "two"}, "cache_interval"),
                           ({"timestep_spacing": "x"}, "timestep_spacing"),
                           ({"eta": "0.5", "sampler": "euler"}, "eta"), ({"sampler": "lcm"}, "sampler")):
            r = c.post("/v1/images/edits", data={**form, **bad}, files=files)
            assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text


@trained
def test_listings_say_what_each_sampler_needs(stack):
    with stack["api"].client(ALICE) as c:
        card = c.get("/v1/models").json()["data"][0]
        listed = {d["name"]: d for d in c.get("/v1/loras").json()["data"]}
        a1111 = [s["name"] for s in c.get("/sdapi/v1/samplers").json()]
    info = card["info"]
    assert {"lcm", "tcd"} <= set(info["samplers"]) and info["few_step_samplers"] == []
    assert not {"lcm", "tcd"} & set(info["standalone_samplers"]) and "dpmpp_2m" in info["standalone_samplers"]
    adapters = {lo["name"]: lo for lo in card["loras"]}
    assert adapters[FEW]["meant_for"] == MEANT_FOR and "meant_for" not in adapters[PLAIN]
    assert listed[FEW]["meant_for"] == MEANT_FOR
    assert {"LCM", "TCD"} <= set(a1111)


@trained
def test_sdapi_lcm_with_the_adapter_tag(stack):
    a1111 = {"steps": 4, "cfg_scale": 1, "seed": 5, "sampler_name": "LCM", "width": 64, "height": 64}
    with stack["api"].client(ALICE) as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": f"{PROMPT} <lora:{FEW}:1>", **a1111}, timeout=180)
        assert r.status_code == 200, r.text
        ours, _ = generate(c, **LCM)
        bad = c.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, **a1111})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "sampler_name", bad.text
    assert "Sampler: LCM" in json.loads(r.json()["info"])["infotexts"][0]
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    assert np.array_equal(got, ours)


# --- the gate without services ------------------------------------------------------------------

INFO = ModelInfo(name="m", native_width=64, native_height=64, vae_factor=8, size_multiple=16, max_side=256,
                 max_pixels=16384)


def _distilled(few) -> ModelInfo:
    unet, vae = {"block_out_channels": [32, 64], "sample_size": 8}, {"block_out_channels": [32, 64]}
    return info_from_configs(unet, vae, {}, has_safety=False, name="d", overrides={"few_step_samplers": few})


def test_a_model_distilled_for_lcm_takes_it_alone():
    info = _distilled(["lcm"])
    assert info.standalone_samplers[-1] == "lcm" and "tcd" not in info.standalone_samplers
    assert resolve(info, prompt="a", sampler="lcm", steps=4, seed=1).sampler == "lcm"
    with pytest.raises(InvalidRequest) as e:
        resolve(info, prompt="a", sampler="tcd", steps=4, seed=1)
    assert e.value.field == "sampler" and "lcm" in e.value.allowed["samplers"]
    for bad in (["ddim"], "lcm", [1]):
        with pytest.raises(ModelLoadError, match="few_step_samplers"):
            _distilled(bad)
    with pytest.raises(ModelLoadError, match="default_sampler"):
        info_from_configs({"block_out_channels": [32, 64]}, {}, {}, has_safety=False, name="d",
                          overrides={"default_sampler": "lcm"})


def test_resolver_fills_eta_and_the_sampling_fields():
    r = resolve(INFO, prompt="a", seed=1, sampler="ddim")
    assert (r.eta, r.timestep_spacing, r.cache_interval) == (0.0, None, 1)
    r = resolve(INFO, prompt="a", seed=1, sampler="euler", timestep_spacing="trailing", cache_interval=3)
    assert (r.eta, r.timestep_spacing, r.cache_interval) == (0.0, "trailing", 3)

    class Adapters:                     # a lora_check as app/loras.py's
        def __call__(self, name):
            return None

        def meant_for(self):
            return {"fast": {"samplers": ["tcd"]}}
    r = resolve(INFO, prompt="a", seed=1, sampler="tcd", steps=4, loras=[{"name": "fast"}], lora_check=Adapters())
    assert (r.eta, r.loras) == (0.3, (("fast", 1.0),))
    with pytest.raises(InvalidRequest) as e:
        resolve(INFO, prompt="a", seed=1, sampler="lcm", steps=4, loras=[{"name": "fast"}], lora_check=Adapters())
    assert e.value.allowed["adapters"] == {"lcm": [], "tcd": ["fast"]}
    for kw, field in ((dict(cache_interval=0), "cache_interval"), (dict(cache_interval=True), "cache_interval"),
                      (dict(timestep_spacing="cosine"), "timestep_spacing"),
                      (dict(sampler="euler", eta=0.2), "eta")):
        with pytest.raises(InvalidRequest) as e:
            resolve(INFO, prompt="a", seed=1, **kw)
        assert e.value.field == field and e.value.allowed


def test_meant_for_reads_only_what_is_well_formed():
    from latentd.model.lora_catalog import meant_for

    assert meant_for({"meant_for": MEANT_FOR}) == MEANT_FOR
    assert meant_for({"meant_for": {"samplers": ["lcm", "nope"], "steps": [8, 1], "guidance_scale": "1"}}) == \
        {"samplers": ["lcm"]}
    assert meant_for({}) == meant_for({"meant_for": "lcm"}) == {}
