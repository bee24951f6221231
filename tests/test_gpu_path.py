"""The GPU fast path's code, exercised on the CPU: half precision (bfloat16 runs the code paths
float16 runs on CUDA), no tensor read back to the host inside the denoising loop, torch.compile
with shape buckets, and the tiled VAE decode. Figures on a GPU: bench/gpu.py."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from latentd.model import compile as compiling
from latentd.model import tiling
from latentd.model.errors import ModelLoadError
from latentd.model.memory import RequestCost, measure
from latentd.model.pipeline import GenerationRequest, load_pipeline
from latentd.model.precision import parse_dtype, vae_dtype

REQ = dict(prompt="a red cat", steps=4, guidance_scale=7.5, sampler="dpmpp_2m")


@pytest.fixture(scope="module")
def pipe32(tiny_model):
    return load_pipeline(tiny_model, device="cpu", dtype=torch.float32, safety=False)


def _pixels(pipe, reqs) -> list[np.ndarray]:
    return [np.asarray(g.image).astype(np.int16) for g in pipe.generate(reqs)]


# --- half precision ---------------------------------------------------------------------------
def test_bfloat16_weights_with_float32_sampler_state(tiny_model, pipe32):
    pipe = load_pipeline(tiny_model, device="cpu", dtype="bfloat16", safety=True)
    assert next(pipe.unet.parameters()).dtype == torch.bfloat16
    assert next(pipe.text.model.parameters()).dtype == torch.bfloat16
    assert next(pipe.safety.parameters()).dtype == torch.bfloat16
    assert pipe.vae_dtype == torch.bfloat16          # bfloat16 has float32's range: no upcast
    req = pipe.validate(GenerationRequest(seed=3, **REQ))
    [st] = [pipe.start(req, c) for c in pipe.encode([req])]
    while not st.done:
        pipe.step([st])
        assert st.latent.dtype == torch.float32 and st.x0_prev.dtype == torch.float32
    assert torch.isfinite(st.latent).all()
    [out] = pipe.finish([st])                        # decode + safety check in bfloat16
    assert out.image.size == (64, 64)
    pipe.safety = None
    half = _pixels(pipe, [req])[0]
    full, other = _pixels(pipe32, [req, GenerationRequest(seed=4, **REQ)])
    diff = np.abs(half - full)            # bfloat16 keeps 8 bits of mantissa: close, not equal
    assert diff.mean() < 0.2 * np.abs(other - full).mean(), (diff.mean(), np.abs(other - full).mean())


def test_dtype_rules():
    assert vae_dtype(torch.float16, force_upcast=True) == torch.float32     # SD's VAE overflows fp16
    assert vae_dtype(torch.float16, force_upcast=False) == torch.float16
    assert vae_dtype(torch.bfloat16, force_upcast=True) == torch.bfloat16
    assert parse_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ModelLoadError, match="float64"):
        parse_dtype("float64")


def test_float16_on_the_cpu_is_refused(tiny_model):
    with pytest.raises(ModelLoadError, match="float16 is not supported on the CPU"):
        load_pipeline(tiny_model, device="cpu", dtype=torch.float16)


# --- no host syncs --------------------------------------------------------------------------------
class NoHostReads(TorchFunctionMode):
    """Raises on every way Python reads a tensor's values (on CUDA each one waits for the GPU)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__,
             torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"host read of a tensor: {func.__name__}")
        return func(*args, **(kwargs or {}))


def test_denoising_step_reads_no_tensor_back(pipe32):
    t = torch.ones(2)
    with NoHostReads():            # the guard itself works
        with pytest.raises(AssertionError, match="item"):
            t.sum().item()
        with pytest.raises(AssertionError, match="__bool__"):
            bool(t.sum() > 0)
    reqs = [pipe32.validate(GenerationRequest(seed=1, **REQ)),
            pipe32.validate(GenerationRequest(seed=2, **{**REQ, "sampler": "euler_a"}))]   # draws noise every step
    states = [pipe32.start(r, c) for r, c in zip(reqs, pipe32.encode(reqs))]
    with NoHostReads():
        for _ in range(3):         # first order, then second order with x0_prev (DPM++ 2M)
            pipe32.step(states)
    assert all(s.step == 3 for s in states)


# --- torch.compile ---------------------------------------------------------------------------------
def test_row_buckets_and_modes():
    assert compiling.row_buckets(1) == (2,)
    assert compiling.row_buckets(16) == (2, 4, 8, 16, 32)
    assert compiling.row_buckets(12) == (2, 4, 8, 16, 24)
    with pytest.raises(ValueError, match="one of"):
        compiling.check_mode("fast")
    with pytest.raises(ValueError, match="CUDA"):
        compiling.check_mode("cudagraphs", "cpu")


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_step_matches_eager_with_bounded_compiles(tiny_model):
    pipe = load_pipeline(tiny_model, device="cpu", dtype=torch.float32, safety=False)
    reqs = [GenerationRequest(seed=s, **REQ) for s in (1, 2, 3, 4)]
    eager = _pixels(pipe, reqs[:3])
    torch._dynamo.reset()
    unet = compiling.enable(pipe, "on", max_batch=4)
    assert unet.buckets == (2, 4, 8)
    compiling.warmup(pipe, rows=(8,))                # what the worker does before it is ready
    assert unet.compiles == 1
    graphs = _graphs()
    padded = _pixels(pipe, reqs[:3])                 # 6 rows, padded to the 8-row bucket
    full = _pixels(pipe, reqs)                       # 8 rows
    assert unet.compiles == 1
    assert _graphs() == graphs, "the warm-up's inputs must match the real step's (no recompile)"
    for got, ref in zip(padded, eager):
        assert np.abs(got - ref).max() <= 2          # compiled kernels round differently
    for got, ref in zip(full, padded):
        assert np.abs(got - ref).max() <= 2          # padding rows do not leak into real ones


# --- tiled VAE decode -----------------------------------------------------------------------------
def test_tile_starts_cover_with_overlap():
    assert tiling.tile_starts(8, 16, 4) == [0]
    starts = tiling.tile_starts(40, 16, 4)
    assert starts[0] == 0 and starts[-1] == 40 - 16
    assert all(b - a <= 16 - 4 for a, b in zip(starts, starts[1:]))


def test_tiled_placement_and_blending_exact_for_a_pointwise_decoder():
    z = torch.randn(2, 4, 40, 28, generator=torch.Generator().manual_seed(0))
    up = lambda t: F.interpolate(t[:, :3], scale_factor=8, mode="nearest")   # noqa: E731
    np.testing.assert_allclose(tiling.decode_tiled(up, z, tile=16, overlap=6), up(z), atol=1e-5)


def test_tiled_decode_close_to_whole_decode(pipe32):
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    z2 = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = pipe32.vae.decode(z)
        assert torch.equal(tiling.decode(pipe32.vae, z, tile=32), whole)     # fits: not tiled
        tiled = tiling.decode(pipe32.vae, z, tile=16, overlap=8)
        unrelated = (pipe32.vae.decode(z2) - whole).abs().mean()
    assert tiled.shape == whole.shape == (1, 3, 256, 256)
    err = (tiled - whole).abs().mean()    # the decoder sees less context per tile, nothing else
    assert err < 0.35 * unrelated, (err, unrelated)   # random VAE: GroupNorm stats and attention per tile


def test_pipeline_decodes_large_latents_in_tiles(pipe32):
    req = GenerationRequest(seed=5, **REQ)
    whole, other = _pixels(pipe32, [req, GenerationRequest(seed=6, **REQ)])
    pipe32.decode_tile = 4                           # the 8x8 latent in 4x4 tiles
    try:
        tiled = _pixels(pipe32, [req])[0]
    finally:
        pipe32.decode_tile = tiling.DEFAULT_TILE
    assert 0 < np.abs(tiled - whole).mean() < 0.25 * np.abs(other - whole).mean()


# --- measured memory ------------------------------------------------------------------------------
def test_request_cost_scales_with_latent_cells(pipe32):
    cost = RequestCost(size=(64, 64), weights_mb=2000.0, per_request_mb=300.0, fixed_mb=1500.0)
    assert cost.estimate((64, 64)) == 300.0
    assert cost.estimate((128, 64)) == 600.0
    assert cost.request_budget(8000) == 4500.0
    assert measure(pipe32) is None                   # no peak counter on the CPU


def test_admission_by_measured_cost_and_prepare_on_the_cpu(pipe32):
    from latentd.config.settings import Settings
    from latentd.worker.executor import BatchExecutor, Progress
    from latentd.worker.prepare import prepare

    # a measured cost as model.memory.measure returns it on a GPU: 3 requests fit, the 4th waits
    cost = RequestCost(size=(8, 8), weights_mb=1000.0, per_request_mb=100.0, fixed_mb=500.0)
    ex = BatchExecutor(pipe32, max_batch=8, memory_budget_mb=cost.request_budget(1850.0),
                       memory_estimate=cost.estimate)
    for i in range(4):
        ex.add(f"r{i}", "k", ex.pipe.validate(GenerationRequest(seed=i, **REQ)))
    events = ex.iterate()
    assert sorted(e.request_id for e in events if isinstance(e, Progress)) == ["r0", "r1", "r2"]
    assert ex.running_count == 3 and ex.waiting_count == 1
    # the CPU has no peak counter: the budget stays whole and the executor's estimate is used
    assert prepare(pipe32, Settings(compile="off", worker_memory_budget_mb=5000)) == (5000.0, None)
    assert prepare(pipe32, Settings(compile="off")) == (None, None)
