"""Resolving a request once (jobs/request_resolve.py: defaults, service bounds, then the model's
model/request.py check), and the worker's check of a JobSpec, which fills nothing in; torch-free."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from latentd.jobs.request import Limits
from latentd.jobs.request_resolve import resolve
from latentd.jobs.spec import JobSpec
from latentd.model.errors import InvalidRequest
from latentd.model.info import ModelInfo
from latentd.model.request import MAX_SEED, start_step

INFO = ModelInfo(name="m", native_width=64, native_height=64, vae_factor=8, size_multiple=16,
                 max_side=256, max_pixels=16384, default_steps=20, default_sampler="dpmpp_2m")


def test_defaults_come_from_the_model():
    r = resolve(INFO, prompt="a cat", seed=3)
    assert (r.width, r.height, r.steps, r.sampler, r.guidance_scale, r.karras) == (64, 64, 20, "dpmpp_2m", 7.5, False)
    assert (r.kind, r.strength, r.output_format, r.n, r.seed, r.eta) == ("text", None, "png", 1, 3, 0.0)
    r = resolve(INFO, prompt="a cat", size="32x48", image_size=(64, 64))
    assert (r.width, r.height, r.kind, r.strength) == (32, 48, "img2img", 0.8)
    assert 0 <= r.seed < MAX_SEED
    r = resolve(INFO, prompt="a cat", image_size=(48, 32), mask_size=(48, 32), steps=10)
    assert (r.width, r.height, r.kind, r.strength) == (48, 32, "inpaint", 1.0)
    assert isinstance(resolve(INFO, prompt="a", guidance_scale=7).guidance_scale, float)


def test_resolved_is_exactly_a_job_spec():
    r = resolve(INFO, prompt="a cat", image_size=(64, 64), classifier_guidance=None, seed=1)
    spec = JobSpec(owner="o", **r.to_dict())
    assert spec.params() == r.to_dict()


def test_start_step_counts_as_diffusers():
    assert start_step(10, None) == 0 and start_step(10, 1.0) == 0
    assert start_step(10, 0.3) == 7 and start_step(10, 0.7) == 3 and start_step(10, 0.05) == 10
    assert start_step(20, 0.8) == 4


BAD = [
    (dict(prompt=5), "prompt"), (dict(prompt="x" * 5000), "prompt"), (dict(prompt="a\x00"), "prompt"),
    (dict(n=0), "n"), (dict(n=17), "n"), (dict(size="big"), "size"), (dict(size="65x64"), "size"),
    (dict(steps=0), "steps"), (dict(steps=151), "steps"),
    (dict(guidance_scale=float("inf")), "guidance_scale"), (dict(sampler="plms"), "sampler"),
    (dict(karras=True, sampler="ddim"), "karras"), (dict(eta=0.3), "eta"),
    (dict(seed=-1), "seed"), (dict(seed=MAX_SEED - 1, n=2), "seed"),
    (dict(strength=0.5), "strength"), (dict(mask_size=(64, 64)), "image"),
    (dict(image_size=(64, 64), strength=0), "strength"), (dict(image_size=(64, 64), strength=1.01), "strength"),
    (dict(image_size=(64, 64), steps=4, strength=0.2), "strength"),
    (dict(image_size=(64, 64), mask_size=(64, 32)), "mask"), (dict(image_size=(72, 72)), "image"),
    (dict(image_size=(5000, 5000), size="64x64"), "image"), (dict(output_format="gif"), "output_format"),
    (dict(output_compression=101), "output_compression"), (dict(model="other"), "model"),
    (dict(classifier_guidance={"color": "red"}), "classifier_guidance"),
]


@pytest.mark.parametrize("kw,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_each_bad_field_is_named_with_its_range(kw, field):
    args = {"prompt": "a cat", **kw}
    with pytest.raises(InvalidRequest) as e:
        resolve(INFO, **args)
    assert e.value.field == field and str(e.value).startswith(f"{field}: ")
    assert e.value.allowed is not None or field == "classifier_guidance"   # no classifier: nothing


def test_deployment_limits():
    lim = Limits(max_n=2, max_prompt_chars=10, max_image_pixels=100)
    with pytest.raises(InvalidRequest, match="n: "):
        resolve(INFO, prompt="a", n=3, limits=lim)
    with pytest.raises(InvalidRequest, match="prompt: "):
        resolve(INFO, prompt="x" * 11, limits=lim)
    with pytest.raises(InvalidRequest) as e:
        resolve(INFO, prompt="a", image_size=(16, 16), limits=lim)
    assert e.value.field == "image" and e.value.allowed == {"max_pixels": 100}


def test_job_spec_is_checked_not_resolved_again():
    spec = JobSpec(prompt="a cat", owner="o", width=64, height=64, steps=10, kind="inpaint", strength=0.5,
                   output_format="webp", output_compression=80, seed=1)
    assert spec.check(INFO) == spec                       # complete: returned as it is
    assert spec.run_steps == 5 and JobSpec.from_json(spec.to_json()) == spec
    assert spec.params()["kind"] == "inpaint" and "owner" not in spec.params()
    with pytest.raises(InvalidRequest, match="steps"):
        spec.model_copy(update={"steps": 151}).check(INFO)
    with pytest.raises(InvalidRequest, match="width"):
        spec.model_copy(update={"width": 72}).check(INFO)
    with pytest.raises(ValueError):
        JobSpec(prompt="x", owner="o", strength=0.5)                  # strength without an edit
    with pytest.raises(ValueError):
        JobSpec(prompt="x", owner="o", kind="img2img", strength=0.5)  # an edit's size is resolved
    # a spec built by hand without a size runs at the model's native size
    bare = JobSpec(prompt="x", owner="o", seed=5, n=2).check(INFO)
    assert (bare.width, bare.height) == (64, 64)
    assert [bare.image_request_kwargs(k)["seed"] for k in range(2)] == [5, 6]


def test_resolver_is_torch_free():
    code = ("import sys, latentd.jobs.request_resolve, latentd.jobs.spec, latentd.model.edit_inputs, "
            "latentd.app.schemas\nassert 'torch' not in sys.modules, 'torch imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
