"""Random LoRA files for tests and benchmarks: the diffusers/PEFT layout on chosen layers of a
model, with B non-zero (a fresh adapter's B = 0 would change nothing)."""
from __future__ import annotations

from pathlib import Path


def write_random_lora(shapes: dict, path, rank: int, seed: int, parts=("unet", "text_encoder"),
                      targets: tuple[str, ...] | None = None, every: int = 1, scale: float = 0.3) -> Path:
    """shapes: {"<component>:<module path>": weight shape} (Pipeline.lora_shapes). Every `every`-th
    layer (in key order) of `parts` whose path ends with one of `targets` (None: all) gets a pair
    A (r, in[, kh, kw]), B (out, r[, 1, 1]) ~ N(0, scale^2), r = min(rank, out, in)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        comp, name = key.split(":", 1)
        if comp not in parts or i % every or (targets and not name.endswith(targets)):
            continue
        r, k = min(rank, shape[0], shape[1]), shape[2:]
        state[f"{comp}.{name}.lora_A.weight"] = torch.randn((r, shape[1], *k), generator=g) * scale
        state[f"{comp}.{name}.lora_B.weight"] = torch.randn((shape[0], r, *([1] * len(k))), generator=g) * scale
    save_file(state, str(path))
    return Path(path)
