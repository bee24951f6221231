"""Adapters per row in one U-Net call: each image equals its request run alone, bit for bit, with
several adapter mixes, scales and a no-adapter row in one batch; scale 0 is the base model; the
library loads each file once and keeps a byte-bounded LRU."""
from __future__ import annotations

import os

import numpy as np
import pytest

from devkit.lora_files import write_random_lora
from latentd.model.lora_library import LoraLibrary, UnknownAdapter
from latentd.model.pipeline import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")


def random_lora(pipe, path, rank: int, seed: int, parts=("unet", "text_encoder"), every: int = 1):
    """A PEFT-layout file on every `every`-th adaptable layer of `parts` (convs included), B != 0."""
    return write_random_lora(pipe.lora_shapes, path, rank, seed, parts, every=every)


@pytest.fixture(scope="module")
def lib(tiny_pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    random_lora(tiny_pipe, d / "a.safetensors", 4, 1)
    random_lora(tiny_pipe, d / "b.safetensors", 8, 2, every=2)
    (d / "sub").mkdir()
    random_lora(tiny_pipe, d / "sub" / "c.safetensors", 2, 3, parts=("unet",))
    random_lora(tiny_pipe, d / "t.safetensors", 4, 4, parts=("text_encoder",))
    return LoraLibrary(tiny_pipe, model_dir=None, lora_dir=str(d))


def _img(g) -> np.ndarray:
    return np.asarray(g.image)


def test_mixed_adapters_in_one_batch_equal_each_alone(tiny_pipe, lib):
    mixes = [(), (("a", 1.0),), (("b", 0.7),), (("a", 0.5), ("b", 1.0)), (("sub/c", 1.3), ("a", -0.4)),
             (("t", 0.9),), (("a", 0.0),)]
    reqs = [GenerationRequest("a red cat", steps=4, seed=10 + i, sampler=("euler", "dpmpp_2m")[i % 2],
                              guidance_scale=(5.0, 1.0, 7.5)[i % 3], loras=lib.resolve(m))
            for i, m in enumerate(mixes)]
    batch = tiny_pipe.generate(reqs)
    base = tiny_pipe.generate([GenerationRequest("a red cat", steps=4, seed=10, sampler="euler", guidance_scale=5.0)])[0]
    for i, (r, g) in enumerate(zip(reqs, batch)):
        alone = tiny_pipe.generate([r])[0]
        assert np.array_equal(_img(alone), _img(g)), f"row {i} ({mixes[i]}) differs from its solo run"
    assert not np.array_equal(_img(batch[1]), _img(tiny_pipe.generate([GenerationRequest(
        "a red cat", steps=4, seed=11, sampler="dpmpp_2m", guidance_scale=1.0)])[0])), "adapter a changed nothing"
    assert np.array_equal(_img(base), _img(batch[0]))


def test_scale_zero_is_the_base_model_exactly(tiny_pipe, lib):
    r = dict(prompt="a red cat", steps=3, seed=5)
    plain = tiny_pipe.generate([GenerationRequest(**r)])[0]
    zero = tiny_pipe.generate([GenerationRequest(**r, loras=lib.resolve([("a", 0.0), ("t", 0.0)]))])[0]
    assert np.array_equal(_img(plain), _img(zero))


def test_the_order_adapters_are_named_in_does_not_matter(tiny_pipe, lib):
    r = dict(prompt="a red cat", steps=3, seed=6)
    ab = tiny_pipe.generate([GenerationRequest(**r, loras=lib.resolve([("a", 0.5), ("b", 1.0)]))])[0]
    ba = tiny_pipe.generate([GenerationRequest(**r, loras=lib.resolve([("b", 1.0), ("a", 0.5)]))])[0]
    assert np.array_equal(_img(ab), _img(ba))


def test_library_loads_once_and_evicts_by_bytes(tiny_pipe, tmp_path):
    for i in range(3):
        random_lora(tiny_pipe, tmp_path / f"l{i}.safetensors", 4, 20 + i)
    probe = LoraLibrary(tiny_pipe, lora_dir=str(tmp_path))
    one = probe.get("l0").nbytes
    lib = LoraLibrary(tiny_pipe, lora_dir=str(tmp_path), cache_mb=2.5 * one / 2 ** 20)   # room for two
    a0 = lib.get("l0")
    assert lib.get("l0") is a0 and (lib.loads, lib.hits) == (1, 1)
    lib.get("l1")
    lib.get("l2")                                  # evicts l0, the least recently used
    assert lib.cached_bytes <= 2.5 * one and lib.loads == 3
    assert lib.get("l0") is not a0 and lib.loads == 4
    # a file added later is found; a changed file is read again
    random_lora(tiny_pipe, tmp_path / "late.safetensors", 2, 30)
    late = lib.get("late")
    random_lora(tiny_pipe, tmp_path / "late.safetensors", 2, 31)
    os.utime(tmp_path / "late.safetensors", ns=(1, 10 ** 18))
    assert lib.get("late") is not late
    with pytest.raises(UnknownAdapter, match="nope"):
        lib.get("nope")
    with pytest.raises(ValueError, match="adapter name"):
        lib.get("../l0")
