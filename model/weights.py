"""Reading and writing weights: safetensors only, declarative rename tables, loud key/shape checks.

Weights are never unpickled: `.ckpt`/`.bin`/`.pt` files are refused with a note on converting them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from latentd.model.errors import ModelLoadError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
CONVERT_HINT = (
    "latentd never unpickles weights (a pickle can run arbitrary code). Convert it once, in an "
    "environment you trust, to safetensors: for a diffusers folder, "
    "`DiffusionPipeline.from_pretrained(src).save_pretrained(dst, safe_serialization=True)`; for a "
    "single-file checkpoint, `safetensors.torch.save_file({k: v.contiguous() for k, v in "
    "torch.load(src, weights_only=True)['state_dict'].items()}, dst)` (or diffusers' "
    "scripts/convert_original_stable_diffusion_to_diffusers.py)."
)

# diffusers folders written before diffusers 0.14 name the VAE mid-block attention differently.
VAE_DIFFUSERS_RENAMES = [
    (r"^(.*mid_block\.attentions\.0)\.query\.", r"\1.to_q."),
    (r"^(.*mid_block\.attentions\.0)\.key\.", r"\1.to_k."),
    (r"^(.*mid_block\.attentions\.0)\.value\.", r"\1.to_v."),
    (r"^(.*mid_block\.attentions\.0)\.proj_attn\.", r"\1.to_out.0."),
]


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{path}: pickled weights ({path.suffix}) are refused. {CONVERT_HINT}")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file (or of a sharded set, given its *.index.json), on CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: weights file not found")
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{path}: not a valid safetensors index ({e})") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_safetensors(path.parent / shard))
        return state
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({e})") from None


def rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply (regex, replacement) rules, in order, to every key."""
    compiled = [(re.compile(p), r) for p, r in rules]
    out = {}
    for key, value in state.items():
        for pattern, repl in compiled:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state(module: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise ModelLoadError naming `source` and the keys unless `state` has exactly the module's
    keys with exactly its shapes."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    wrong = [f"{k} (file {tuple(state[k].shape)}, model {expected[k]})"
             for k in sorted(expected.keys() & state.keys()) if tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_listing(wrong)}")
    if problems:
        raise ModelLoadError(f"{source}: weights do not match {type(module).__name__}; " + "; ".join(problems))


def load_into(build, state: dict[str, torch.Tensor], source: str | Path, device="cpu",
              dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build a module with `build()` on the meta device (no random init, no second copy), check
    `state` against it, and give it the tensors of `state` (moved to device/dtype)."""
    try:
        with torch.device("meta"):
            module = build()
    except (ValueError, RuntimeError) as e:       # e.g. channels not divisible by the group count
        raise ModelLoadError(f"{source}: the config does not describe a buildable network ({e})") from None
    check_state(module, state, source)
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def save_module(module: nn.Module, config: dict, folder: str | Path,
                weights_name: str = "diffusion_pytorch_model.safetensors") -> Path:
    """Write config.json + safetensors weights in diffusers' layout (diffusers can load the folder)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(folder / weights_name), metadata={"format": "pt"})
    return folder
