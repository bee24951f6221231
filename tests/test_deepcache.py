"""DeepCache per row (model/deepcache.py): rows with and without caching, at full and cached
steps, share one U-Net call and each image equals its request run alone; the split U-Net equals
the plain one on every row; a row saved between full steps resumes exactly; bad values are named."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from latentd.model import deepcache
from latentd.model.errors import InvalidRequest
from latentd.model.pipeline import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")


def _img(g) -> np.ndarray:
    return np.asarray(g.image)


def test_split_unet_equals_the_plain_one_on_every_row(tiny_pipe):
    u = tiny_pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([999.0, 500.0, 500.0, 20.0])
    ctx = torch.randn(4, 77, u.config.cross_attention_dim, generator=g)
    with torch.inference_mode():
        plain = u(x, t, ctx)
        out, feats = deepcache.forward(u, x, t, ctx, None, [0, 1, 2, 3], None)
        assert torch.equal(out, plain)
        for deep in ([0, 2], [3], []):
            rest = [i for i in range(4) if i not in deep]
            out, fresh = deepcache.forward(u, x, t, ctx, None, deep, feats[rest])
            assert torch.equal(out, plain), deep
            assert torch.equal(fresh, feats[deep]) if deep else fresh.shape[0] == 0


def test_cached_and_plain_rows_in_one_batch_equal_each_alone(tiny_pipe):
    reqs = [GenerationRequest("a red cat", steps=7, seed=20 + i, sampler=s, guidance_scale=w, cache_interval=n)
            for i, (s, w, n) in enumerate([("dpmpp_2m", 5.0, 1), ("dpmpp_2m", 5.0, 3), ("euler", 1.0, 2),
                                            ("ddim", 7.5, 5), ("lcm", 1.0, 2)])]
    batch = tiny_pipe.generate(reqs)
    for i, (r, g) in enumerate(zip(reqs, batch)):
        assert np.array_equal(_img(tiny_pipe.generate([r])[0]), _img(g)), f"request {i} differs from its solo run"
    plain = tiny_pipe.generate([GenerationRequest("a red cat", steps=7, seed=21, guidance_scale=5.0)])[0]
    assert not np.array_equal(_img(plain), _img(batch[1])), "cache_interval 3 changed nothing"


def test_a_row_saved_between_full_steps_resumes_exactly(tiny_pipe):
    req = tiny_pipe.validate(GenerationRequest("a red cat", steps=6, seed=3, cache_interval=3))
    want = _img(tiny_pipe.run([req])[0])
    (cond,) = tiny_pipe.encode([req])
    s = tiny_pipe.start(req, cond)
    for _ in range(4):                      # full at 0 and 3, cached at 1, 2; saved before step 4
        tiny_pipe.step([s])
    row = tiny_pipe.save_row(s)
    r = tiny_pipe.resume(req, cond, type(row).from_bytes(row.to_bytes()))
    assert r.deep is not None and torch.equal(r.deep, s.deep)
    while not r.done:
        tiny_pipe.step([r])
    assert np.array_equal(_img(tiny_pipe.finish([r])[0]), want)


@pytest.mark.parametrize("bad", [0, 11, 2.5, "3"])
def test_cache_interval_out_of_range_is_named(tiny_pipe, bad):
    with pytest.raises(InvalidRequest) as e:
        tiny_pipe.generate([GenerationRequest("a red cat", steps=2, cache_interval=bad)])
    assert e.value.field == "cache_interval"
