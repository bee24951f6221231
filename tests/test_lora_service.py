"""LoRA adapters through a real service (redis-server, uvicorn API, `latentd worker`) on the
bundled model, with small random adapters in a LATENTD_LORA_DIR made here:

- `loras` and `<lora:NAME:SCALE>` in the prompt draw what `latentd generate --lora` draws
  locally, bit for bit, also when requests with other adapter mixes share the worker's batches;
- the prompt's tags are taken out of `revised_prompt`; edits take `loras` as a JSON string;
- bad adapters are 422s naming the field and the adapter, and nothing is queued; a job whose
  adapter the worker cannot load fails alone;
- the adapter folder is read on each request; /v1/models, /v1/loras and /sdapi/v1/loras list
  adapters; the worker's metrics count loads and cache hits."""
from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from devkit.api_proc import ALICE, service_stack, wait_job
from devkit.services import ROOT, free_port
from latentd.jobs import keys

MODEL = Path(__file__).resolve().parent.parent / "models" / "shapes"
pytestmark = pytest.mark.skipif(not (MODEL / "model_index.json").is_file(),
                                reason="models/shapes/ not trained yet")
PROMPT = "a red star on a black background"
FAST = {"steps": 6, "sampler": "dpmpp_2m", "seed": 11}
CROSS = [f"{b}.attentions.{i}.transformer_blocks.0.attn2.{p}" for b, n in
         (("down_blocks.1", 1), ("down_blocks.2", 1), ("mid_block", 1), ("up_blocks.0", 2), ("up_blocks.1", 2))
         for i in range(n) for p in ("to_k", "to_v")]
WIDTH = {"down_blocks.1": 64, "down_blocks.2": 128, "mid_block": 128, "up_blocks.0": 128, "up_blocks.1": 64}


def _peft(path: Path, layers: dict[str, tuple], seed: int, rank: int = 4) -> None:
    """A PEFT-layout LoRA file: module path -> the layer's weight shape (out, in[, kh, kw])."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    out = {}
    for module, shape in layers.items():
        down = (rank, *shape[1:])
        up = (shape[0], rank, *([1, 1] if len(shape) == 4 else []))
        out[f"{module}.lora_A.weight"] = (rng.standard_normal(down) * 0.3).astype(np.float32)
        out[f"{module}.lora_B.weight"] = (rng.standard_normal(up) * 0.3).astype(np.float32)
    save_file(out, str(path), metadata={"format": "pt"})


def _cross(ctx: int = 64) -> dict:
    return {f"unet.{m}": (WIDTH[m.split(".attentions")[0]], ctx) for m in CROSS}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    # A: the U-Net's cross-attention keys/values and one 3x3 convolution (LoCon)
    _peft(d / "lora_a.safetensors", {**_cross(), "unet.down_blocks.1.resnets.0.conv1": (64, 32, 3, 3)}, 1)
    # B: self-attention of the middle block and the text encoder's first layer
    _peft(d / "lora_b.safetensors", {**{f"unet.mid_block.attentions.0.transformer_blocks.0.attn1.{p}": (128, 128)
                                        for p in ("to_q", "to_v")},
                                     **{f"text_encoder.encoder.layers.0.self_attn.{p}": (64, 64)
                                        for p in ("q_proj", "v_proj")}}, 2, rank=2)
    (d / "broken.safetensors").write_bytes(b"\x13\x37 not a safetensors file at all")
    _peft(d / "xl_only.safetensors", {"text_encoder_2.encoder.layers.0.self_attn.q_proj": (64, 64)}, 3)
    _peft(d / "wide.safetensors", _cross(768), 4)            # made for SD 1.x's 768-wide context
    return d


@pytest.fixture(scope="module")
def stack(lora_dir):
    with service_stack(MODEL, {"lora_dir": lora_dir}, lora_dir=lora_dir,
                       worker_metrics_port=free_port()) as s:
        yield s


_cli_cache: dict = {}


def cli_image(stack, lora_dir, tmp_path_factory, *loras: str) -> np.ndarray:
    """`latentd generate PROMPT --lora ...` on the local engine (same threads as the worker)."""
    if loras not in _cli_cache:
        out = tmp_path_factory.mktemp("cli") / "out.png"
        flags = [a for lo in loras for a in ("--lora", lo)]
        env = dict(stack["worker"].env, LATENTD_LORA_DIR=str(lora_dir))
        p = subprocess.run([sys.executable, "-m", "latentd.cli", "generate", PROMPT, *flags, "--steps",
                            str(FAST["steps"]), "--sampler", FAST["sampler"], "--seed", str(FAST["seed"]),
                            "--model", str(MODEL), "--out", str(out)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        _cli_cache[loras] = np.asarray(Image.open(out).convert("RGB"))
    return _cli_cache[loras]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def generate(c: httpx.Client, prompt: str = PROMPT, **body) -> dict:
    r = c.post("/v1/images/generations", json={"prompt": prompt, "response_format": "b64_json",
                                               **FAST, **body}, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


def test_loras_field_and_prompt_tag_match_the_cli(stack, lora_dir, tmp_path_factory):
    with stack["api"].client(ALICE) as c:
        by_field = generate(c, loras=[{"name": "lora_a"}])
        by_tag = generate(c, "a red <lora:lora_b:0.6> star on a black background")
    assert by_tag["data"][0]["revised_prompt"] == PROMPT
    a = pixels(base64.b64decode(by_field["data"][0]["b64_json"]))
    b = pixels(base64.b64decode(by_tag["data"][0]["b64_json"]))
    assert np.array_equal(a, cli_image(stack, lora_dir, tmp_path_factory, str(lora_dir / "lora_a.safetensors")))
    assert np.array_equal(b, cli_image(stack, lora_dir, tmp_path_factory, "lora_b:0.6"))
    assert not np.array_equal(a, cli_image(stack, lora_dir, tmp_path_factory))


def test_mixed_adapters_in_one_batch_each_match_their_solo_image(stack, lora_dir, tmp_path_factory):
    path_a = str(lora_dir / "lora_a.safetensors")
    cases = [({}, ()), ({"loras": [{"name": "lora_a"}]}, (path_a,)), ({"loras": [{"name": "lora_b"}]}, ("lora_b",)),
             ({"loras": [{"name": "lora_b"}, {"name": "lora_a", "scale": 1}]}, (path_a, "lora_b")),
             ({"prompt": PROMPT + " <lora:lora_b:0.6>"}, ("lora_b:0.6",))]
    shared_before = _shared_calls(stack)
    with stack["api"].client(ALICE) as c:
        ids = []
        for body, _ in cases:
            r = c.post("/v1/jobs", json={"prompt": PROMPT, **FAST, **body})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        jobs = [wait_job(c, job_id) for job_id in ids]
        assert all(j["status"] == "succeeded" for j in jobs), jobs
        got = [pixels(c.get(j["images"][0]["url"]).content) for j in jobs]
    assert [j["params"]["loras"] for j in jobs] == [[], [["lora_a", 1.0]], [["lora_b", 1.0]],
                                                    [["lora_a", 1.0], ["lora_b", 1.0]], [["lora_b", 0.6]]]
    for image, (body, flags) in zip(got, cases):
        assert np.array_equal(image, cli_image(stack, lora_dir, tmp_path_factory, *flags)), body
    assert len({g.tobytes() for g in got}) == len(cases)           # every mix draws its own image
    assert _shared_calls(stack) > shared_before            # and some U-Net calls mixed them


def _worker_metrics(stack) -> str:
    url = stack["redis"].client().hget(keys.worker(stack["worker"].name), "metrics_url").decode()
    return httpx.get(url, timeout=10).text


def _metric(text: str, name: str, labels: str = "") -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{" + labels))


def _shared_calls(stack) -> float:
    """U-Net calls that stepped more than one request."""
    text = _worker_metrics(stack)
    return (_metric(text, "latentd_worker_batch_size_count")
            - _metric(text, "latentd_worker_batch_size_bucket", 'le="1.0"'))


def _queued(stack) -> int:
    return len(stack["redis"].client().keys(keys.job("*")))


@pytest.mark.parametrize("body, field, says", [
    ({"loras": [{"name": "nope"}]}, "loras", "nope"),
    ({"prompt": PROMPT + " <lora:nope:0.5>"}, "prompt", "nope"),
    ({"loras": [{"name": "lora_a", "scale": 7}]}, "loras.0.scale", "5"),
    ({"prompt": PROMPT + " <lora:lora_a:-6>"}, "prompt", "-5"),
    ({"loras": [{"name": f"n{i}"} for i in range(9)]}, "loras", "8"),
    ({"loras": [{"name": "lora_a"}, {"name": "lora_a", "scale": 0.5}]}, "loras", "lora_a"),
    ({"prompt": PROMPT + " <lora:lora_a>", "loras": [{"name": "lora_a"}]}, "prompt", "lora_a"),
    ({"loras": [{"name": "broken"}]}, "loras", "broken"),
    ({"loras": [{"name": "xl_only"}]}, "loras", "sdxl"),
    ({"loras": [{"name": "wide"}]}, "loras", "768"),
    ({"loras": [{"name": "../lora_a"}]}, "loras", "../lora_a"),
    ({"prompt": PROMPT + " <lyco:lora_a:1>"}, "prompt", "lyco"),
    ({"negative_prompt": "<lora:lora_a:1>"}, "negative_prompt", "prompt"),
])
def test_bad_adapters_are_422_naming_field_and_adapter(stack, body, field, says):
    before = _queued(stack)
    with stack["api"].client(ALICE) as c:
        for path in ("/v1/images/generations", "/v1/jobs"):
            r = c.post(path, json={"prompt": PROMPT, **FAST, **body})
            assert r.status_code == 422, r.text
            err = r.json()["error"]
            assert err["field"] == field and says in err["message"], err
    assert _queued(stack) == before


def test_edit_form_takes_loras_as_json(stack):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "navy").save(buf, format="PNG")
    files = {"image": ("init.png", buf.getvalue(), "image/png")}
    form = {"prompt": PROMPT + " <lora:lora_b:0.5>", "strength": "0.7", "response_format": "b64_json",
            **{k: str(v) for k, v in FAST.items()}}
    with stack["api"].client(ALICE) as c:
        r = c.post("/v1/jobs", data={**form, "loras": json.dumps([{"name": "lora_a", "scale": 0.8}])}, files=files)
        assert r.status_code == 202, r.text
        done = wait_job(c, r.json()["id"])
        assert done["status"] == "succeeded" and done["params"]["loras"] == [["lora_a", 0.8], ["lora_b", 0.5]]
        assert done["params"]["prompt"] == PROMPT
        bad = c.post("/v1/images/edits", data={**form, "loras": "lora_a"}, files=files)
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "loras", bad.text


def test_an_adapter_added_later_is_usable_at_once(stack, lora_dir, tmp_path_factory):
    with stack["api"].client(ALICE) as c:
        r = c.post("/v1/jobs", json={"prompt": PROMPT, "loras": [{"name": "later/copy_of_a"}]})
        assert r.status_code == 422 and "later/copy_of_a" in r.json()["error"]["message"]
        (lora_dir / "later").mkdir(exist_ok=True)
        shutil.copy(lora_dir / "lora_a.safetensors", lora_dir / "later" / "copy_of_a.safetensors")
        out = generate(c, loras=[{"name": "later/copy_of_a"}])
        assert "later/copy_of_a" in [lo["name"] for lo in c.get("/v1/models").json()["data"][0]["loras"]]
    got = pixels(base64.b64decode(out["data"][0]["b64_json"]))
    assert np.array_equal(got, cli_image(stack, lora_dir, tmp_path_factory, str(lora_dir / "lora_a.safetensors")))


def test_listings(stack):
    with stack["api"].client(ALICE) as c:
        card = c.get("/v1/models").json()["data"][0]
        listed = c.get("/v1/loras").json()["data"]
        assert c.get("/v1/loras", params={"model": "shapes"}).json()["data"] == listed
        assert c.get("/v1/loras", params={"model": "nope"}).status_code == 422
        sdapi = c.get("/sdapi/v1/loras").json()
    usable = {lo["name"]: lo for lo in card["loras"]}
    assert {"lora_a", "lora_b"} <= set(usable) and not {"broken", "xl_only", "wide"} & set(usable)
    assert (usable["lora_a"]["rank"], usable["lora_a"]["targets"], usable["lora_a"]["kinds"]) == (4, ["unet"], ["conv", "linear"])
    assert (usable["lora_b"]["rank"], usable["lora_b"]["targets"]) == (2, ["text_encoder", "unet"])
    by_name = {d["name"]: d for d in listed}
    assert by_name["lora_a"]["compatible"] == ["shapes"] and by_name["lora_a"]["context_dim"] == 64
    assert "error" in by_name["broken"] and by_name["broken"]["compatible"] == []
    assert "sdxl" in by_name["xl_only"]["incompatible"]["shapes"]
    assert "768" in by_name["wide"]["incompatible"]["shapes"]
    items = {d["name"]: d for d in sdapi}
    assert items["lora_a"] == {"name": "lora_a", "alias": "lora_a", "path": "lora_a.safetensors", "metadata": {}}
    assert "broken" not in items and "wide" not in items


def test_sdapi_prompt_tag(stack, lora_dir, tmp_path_factory):
    with stack["api"].client(ALICE) as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": PROMPT + " <lora:lora_b:0.6>", "steps": FAST["steps"],
                                              "seed": FAST["seed"], "sampler_name": "DPM++ 2M"}, timeout=180)
        assert r.status_code == 200, r.text
        bad = c.post("/sdapi/v1/txt2img", json={"prompt": PROMPT + " <lora:nope:1>"})
        assert bad.status_code == 422 and "nope" in bad.json()["detail"], bad.text
    info = json.loads(r.json()["info"])
    assert info["prompt"] == PROMPT + " <lora:lora_b:0.6>"
    got = pixels(base64.b64decode(r.json()["images"][0]))
    assert np.array_equal(got, cli_image(stack, lora_dir, tmp_path_factory, "lora_b:0.6"))


def test_worker_fails_only_the_job_whose_adapter_it_cannot_load(stack):
    """A spec that reaches the worker with an adapter it does not have (the API checks its own
    folders; a worker may see others) fails alone; a job beside it runs."""
    from latentd.config.settings import Settings
    from latentd.jobs.client import JobClient
    from latentd.jobs.spec import JobSpec

    client = JobClient(stack["redis"].client(), Settings(redis_url=stack["redis"].url, model=str(MODEL)))
    bad = client.submit(JobSpec(owner="alice", prompt=PROMPT, loras=(("gone", 1.0),), steps=2, seed=1))
    good = client.submit(JobSpec(owner="alice", prompt=PROMPT, loras=(("lora_a", 1.0),), steps=2, seed=1))
    with stack["api"].client(ALICE) as c:
        failed, ok = wait_job(c, bad), wait_job(c, good)
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_request", failed
    assert "gone" in failed["error"]["message"] and failed["error"]["message"].startswith("loras")
    assert ok["status"] == "succeeded" and stack["worker"].alive()


def test_worker_metrics_count_loads_and_hits(stack):
    with stack["api"].client(ALICE) as c:
        for _ in range(2):
            generate(c, loras=[{"name": "lora_a"}], steps=2)
    text = _worker_metrics(stack)
    assert _metric(text, "latentd_worker_lora_loads_total") >= 1
    assert _metric(text, "latentd_worker_lora_cache_hits_total") >= 1
    assert _metric(text, "latentd_worker_lora_cached_bytes") > 0
    assert _metric(text, "latentd_worker_lora_load_seconds_total") > 0
