"""Row state (model/row_state.py): a request saved after k steps, rebuilt from bytes on another
Pipeline of the same model and run on, gives the uninterrupted run's latent and image bit for bit
(CPU, float32): every sampler, including the ones that draw noise every step (DDPM, Euler a,
DDIM with eta > 0), for text-to-image, img2img and inpainting (4-channel blend and 9-channel
U-Net). A row that does not belong to the request, the model or the plan is refused."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from latentd.model.pipeline import GenerationRequest, load_pipeline
from latentd.model.row_state import RowState, RowStateError
from tests.test_edits_engine import init_image, mask_image

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLERS = [("ddpm", {}), ("ddim", {"eta": 0.5}), ("euler", {}), ("euler_a", {}),
            ("dpmpp_2m", {"karras": True})]
KINDS = ["text", "img2img", "inpaint", "inpaint9"]


@pytest.fixture(scope="module")
def pipes(tiny_model, tiny_model_inpaint):
    """Two loads of each model: the one that saves and the one that resumes (another worker)."""
    return {"4": (load_pipeline(tiny_model, safety=False), load_pipeline(tiny_model, safety=False)),
            "9": (load_pipeline(tiny_model_inpaint, safety=False),
                  load_pipeline(tiny_model_inpaint, safety=False))}


def request(sampler, extra, kind, seed=7):
    edit = {}
    if kind == "img2img":
        edit = dict(init_image=init_image(), strength=0.75)
    elif kind.startswith("inpaint"):
        edit = dict(init_image=init_image(), mask=mask_image(), strength=0.75)
    return GenerationRequest("a red cat", negative_prompt="blue", steps=8, sampler=sampler,
                             guidance_scale=5.0, seed=seed, **edit, **extra)


def run_to_end(p, states):
    while not all(s.done for s in states):
        p.step([s for s in states if not s.done])
    return p.finish(states)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sampler,extra", SAMPLERS, ids=[s for s, _ in SAMPLERS])
def test_resumed_row_equals_the_uninterrupted_run(pipes, sampler, extra, kind):
    a, b = pipes["9" if kind == "inpaint9" else "4"]
    req = a.validate(request(sampler, extra, kind))
    (cond,) = a.encode([req])
    whole = a.start(req, cond)
    (want,) = run_to_end(a, [whole])

    k = req.run_steps // 2
    s = a.start(req, cond)
    for _ in range(k):
        a.step([s])
    data = a.save_row(s, meta={"job": "j1", "attempt": 1}).to_bytes()
    # another pipeline (another worker), from bytes alone, batched with an unrelated request
    row = RowState.from_bytes(data)
    assert row.step == k and row.meta == {"job": "j1", "attempt": 1}
    other = b.validate(request("euler_a", {}, "text", seed=99))
    (c1, c2) = b.encode([req, other])
    resumed = b.resume(req, c1, row)
    assert resumed.step == k and resumed.total == req.run_steps
    mate = b.start(other, c2)
    got, _ = run_to_end(b, [resumed, mate])
    print(f"{sampler} {kind}: saved at step {k}/{req.run_steps}, {len(data)} bytes")
    assert torch.equal(resumed.latent, whole.latent), f"{sampler} {kind}: latents differ"
    assert np.array_equal(np.asarray(got.image), np.asarray(want.image))


def test_a_row_saved_before_its_first_step_resumes_too(pipes):
    a, b = pipes["4"]
    req = a.validate(request("euler_a", {}, "text"))
    (cond,) = a.encode([req])
    s = a.start(req, cond)
    row = RowState.from_bytes(a.save_row(s).to_bytes())
    assert "x0_prev" not in row.tensors
    r = b.resume(req, b.encode([req])[0], row)
    (want,) = run_to_end(a, [s])
    (got,) = run_to_end(b, [r])
    assert np.array_equal(np.asarray(got.image), np.asarray(want.image))


def test_rows_that_do_not_fit_are_refused(pipes):
    a, b = pipes["4"]
    req = a.validate(request("dpmpp_2m", {"karras": True}, "img2img"))
    (cond,) = a.encode([req])
    s = a.start(req, cond)
    a.step([s])
    row = RowState.from_bytes(a.save_row(s).to_bytes())
    assert b.resume(req, cond, row).step == 1

    def refused(r, what):
        with pytest.raises(RowStateError, match=what):
            b.resume(r, cond, row)

    refused(dataclasses.replace(req, seed=8), "another request")
    refused(dataclasses.replace(req, steps=10), "another request")
    with pytest.raises(RowStateError, match="model"):
        b.resume(req, cond, dataclasses.replace(row, model=row.model.replace("|sd|", "|sdxl|")))
    with pytest.raises(RowStateError, match="step"):
        b.resume(req, cond, dataclasses.replace(row, step=row.total))
    no_hist = {k: v for k, v in row.tensors.items() if k != "x0_prev"}
    with pytest.raises(RowStateError, match="tensors"):
        b.resume(req, cond, dataclasses.replace(row, tensors=no_hist))
    small = dict(row.tensors, latent=row.tensors["latent"][..., :4])
    with pytest.raises(RowStateError, match="shape"):
        b.resume(req, cond, dataclasses.replace(row, tensors=small))
    inpaint = a.validate(request("dpmpp_2m", {"karras": True}, "inpaint"))
    with pytest.raises(RowStateError):
        b.resume(inpaint, cond, row)


def test_bytes_are_checked(pipes):
    a, _ = pipes["4"]
    req = a.validate(request("ddpm", {}, "text"))
    s = a.start(req, a.encode([req])[0])
    data = a.save_row(s).to_bytes()
    assert data[:4] == b"LDRS"
    # compact: the header plus raw float32 latent (1, 4, 8, 8) and the generator state (5 KB)
    assert len(data) < 64 * 4 + 5056 + 1024
    flipped = bytearray(data)
    flipped[-10] ^= 1
    for bad, why in [(data[:-1], "CRC|shorter"), (bytes(flipped), "CRC"), (b"XXXX" + data[4:], "magic"),
                     (data[:4] + b"\x02\x00" + data[6:], "version"), (data[:8], "short|header")]:
        with pytest.raises(RowStateError, match=why):
            RowState.from_bytes(bad)
