"""Device memory of a request, measured on the device rather than guessed.

`measure(pipe, size)` runs real denoising steps (text encode, start, one U-Net step) at 1 and at
`n` requests of one latent size, and a decode + safety check of one image, reading CUDA's peak
allocation for each. From those:

    weights_mb      memory held before any request (weights, CUDA context not counted)
    per_request_mb  (peak(n) - peak(1)) / (n - 1): what one more request in a batch costs
    fixed_mb        what a step costs beyond its requests (workspace), and the decode + safety
                    peak (images decode one at a time, so it does not grow with the batch)

`RequestCost.estimate(size)` scales per_request_mb by latent cells (activations grow with h x w;
attention runs through memory-efficient SDPA kernels, which are linear in tokens too).
On the CPU there is no peak-allocation counter, and `measure` returns None.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MB = 2**20


@dataclass(frozen=True)
class RequestCost:
    size: tuple[int, int]       # latent (h, w) it was measured at
    weights_mb: float
    per_request_mb: float
    fixed_mb: float

    def estimate(self, size: tuple[int, int]) -> float:
        """MB one request of latent `size` adds to a batched U-Net step."""
        return self.per_request_mb * (size[0] * size[1]) / (self.size[0] * self.size[1])

    def request_budget(self, budget_mb: float) -> float:
        """Of a worker's whole device budget, what is left for requests in flight."""
        return budget_mb - self.weights_mb - self.fixed_mb


def measure(pipe, size: tuple[int, int] | None = None, n: int = 4) -> RequestCost | None:
    """Measure on pipe's CUDA device at latent `size` (default: native). None elsewhere."""
    if pipe.device.type != "cuda" or n < 2:
        return None
    from latentd.model.pipeline import GenerationRequest

    f = pipe.info.vae_factor
    h, w = size or (pipe.info.native_height // f, pipe.info.native_width // f)
    dev = pipe.device
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    peaks, last = {}, None
    for k in (1, n):
        reqs = [GenerationRequest(prompt="memory probe", width=w * f, height=h * f, steps=1, seed=i)
                for i in range(k)]
        torch.cuda.reset_peak_memory_stats(dev)
        states = [pipe.start(r, c) for r, c in zip(reqs, pipe.encode(reqs))]
        pipe.step(states)
        torch.cuda.synchronize(dev)
        peaks[k] = (torch.cuda.max_memory_allocated(dev) - base) / MB
        last = states[:1]
        del states
    torch.cuda.reset_peak_memory_stats(dev)
    pipe.finish(last)
    torch.cuda.synchronize(dev)
    finish_mb = (torch.cuda.max_memory_allocated(dev) - base) / MB
    per = max(0.0, (peaks[n] - peaks[1]) / (n - 1))
    return RequestCost(size=(h, w), weights_mb=base / MB, per_request_mb=per,
                       fixed_mb=max(peaks[1] - per, finish_mb))
