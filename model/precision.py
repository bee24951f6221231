"""Precision and host-to-device transfer rules of the engine, in one place.

- Weights: float32 on the CPU (the bit-identity promise holds there), float16 by default on CUDA,
  bfloat16 on request anywhere (on the CPU it runs the same half-precision code paths as a GPU).
- The VAE: SD's VAE overflows float16 (activations of its up blocks exceed 65504), which
  diffusers records as `force_upcast` in vae/config.json; such a VAE stays in float32.
  bfloat16 has float32's exponent range, so it never needs the upcast.
- Sampler state (latents, x0 estimates, coefficients, noise) is float32 always: it is per-request
  state carried over 50 steps, and a U-Net output is cast up before any sampler arithmetic.
- Host -> device copies inside the denoising loop go through `to_device`: pinned memory and
  non_blocking, so the host never waits for the GPU to drain its queue (a pageable copy with
  non_blocking=False synchronises the stream). Nothing in the loop reads a device value back.
"""
from __future__ import annotations

import torch

from latentd.model.errors import ModelLoadError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float16' | torch.float16 -> torch.float16; anything else is a ModelLoadError naming the choices."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelLoadError(f"dtype {dtype} is not supported; one of: {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_dtype(device: str | torch.device) -> torch.dtype:
    """float16 on CUDA, float32 elsewhere (the CPU's bit-identity promise is for float32)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def check_dtype(device: str | torch.device, dtype: torch.dtype) -> None:
    if torch.device(device).type == "cpu" and dtype == torch.float16:
        raise ModelLoadError("float16 is not supported on the CPU; use float32 or bfloat16")


def vae_dtype(dtype: torch.dtype, force_upcast: bool) -> torch.dtype:
    """The VAE's dtype for weights in `dtype`: float32 where float16 would overflow."""
    return torch.float32 if dtype == torch.float16 and force_upcast else dtype


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host sync: pinned + non_blocking on CUDA (the caching
    host allocator keeps the pinned buffer alive until the copy has run), a plain move elsewhere."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def tune_cuda() -> None:
    """cuDNN picks its fastest convolution algorithm per input shape on first use (the shapes
    of a worker are few and fixed: batch buckets x latent sizes)."""
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
