"""LoRA files (safetensors) -> LoraAdapter (model/lora_runtime.py), in the two layouts people have:

  diffusers / PEFT   unet.<module>.lora_A.weight (down, r x in), .lora_B.weight (up, out x r);
                     text_encoder., text_encoder_2. (SDXL's second encoder); module names are
                     diffusers' (ours). alpha: a <module>.alpha tensor if there is one, else the
                     "lora_adapter_metadata" JSON diffusers writes (per component lora_alpha, r,
                     alpha_pattern), else alpha = r (scale 1), as diffusers assumes.
  kohya (A1111,      lora_unet_<module with _ for .>.lora_down.weight, .lora_up.weight, .alpha;
  ComfyUI)           lora_te_ (SD 1/2), lora_te1_ / lora_te2_ (SDXL). U-Net names are diffusers'
                     (SD 1/2) or the original ones (SDXL: input_blocks_4_1_..., read through
                     model/convert_single_file.py's table). alpha / r scales; no alpha: scale 1.

Linear and Conv2d layers (LoCon: a kh x kw down conv, a 1x1 up conv). Other adapter kinds are
refused by name. Everything a file names must exist in the model with matching shapes, else the
adapter was made for another base model and binding fails, naming the file and a layer.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from latentd.model.lora_catalog import (COMPONENTS, FORMATS, KOHYA_PREFIXES, LoraFormatError, family_of,
                                        format_of)
from latentd.model.lora_runtime import LoraAdapter, LoraLayer

METADATA_KEY = "lora_adapter_metadata"


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the safetensors metadata of a file."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own errors for a malformed header
        raise LoraFormatError(f"{Path(path).name}: not a readable safetensors file ({e})") from None


def _peft_alphas(meta: dict[str, str]) -> dict[str, dict]:
    """Per component {"lora_alpha", "r", "alpha_pattern"} from diffusers' metadata JSON (nested or
    flattened "unet.lora_alpha" keys)."""
    raw = meta.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    out: dict[str, dict] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and key in COMPONENTS:
            out.setdefault(key, {}).update(value)
        elif "." in key and key.split(".", 1)[0] in COMPONENTS:
            comp, field = key.split(".", 1)
            out.setdefault(comp, {})[field] = value
    return out


def parse(state: dict[str, torch.Tensor], meta: dict[str, str], where: str) -> tuple[str, dict[str, tuple]]:
    """-> (format, {raw name: (down, up, alpha or None)}); raw names keep their file's naming
    ("unet.down_blocks.0..." for PEFT, "lora_unet_down_blocks_0_..." for kohya)."""
    fmt = format_of(state, where)
    down_s, up_s = FORMATS[fmt]
    pairs = {}
    for key, down in state.items():
        if not key.endswith(down_s):
            continue
        name = key[: -len(down_s)]
        up = state.get(name + up_s)
        if up is None:
            raise LoraFormatError(f"{where}: {key!r} has no matching {name + up_s!r}")
        if down.shape[0] != up.shape[1] or down.dim() != up.dim() or down.dim() not in (2, 4):
            raise LoraFormatError(f"{where}: {name}: down {tuple(down.shape)} and up {tuple(up.shape)} "
                                  "are not a low-rank pair")
        alpha = state.get(name + ".alpha")
        pairs[name] = (down, up, None if alpha is None else float(alpha.float().reshape(-1)[0]))
    if fmt == "peft":
        metas = _peft_alphas(meta)
        for name, (down, up, alpha) in pairs.items():
            comp = name.split(".", 1)[0]
            m = metas.get(comp)
            if alpha is None and m and m.get("lora_alpha") is not None:
                pattern = m.get("alpha_pattern") or {}
                module = name.split(".", 1)[1] if "." in name else name
                hit = next((v for p, v in pattern.items() if module == p or module.endswith("." + p)), None)
                alpha = float(hit if hit is not None else m["lora_alpha"])
                pairs[name] = (down, up, alpha)
    return fmt, pairs


TEXT_MODEL = "text_model."      # transformers < 5 nests CLIP's layers under text_model; 5 does not


def _norm(key: str) -> str:
    """A layer key without CLIP's optional text_model. level, so files of either kind bind."""
    comp, _, path = key.partition(":")
    if comp != "unet" and path.startswith(TEXT_MODEL):
        path = path[len(TEXT_MODEL):]
    return f"{comp}:{path}"


def _peft_key(name: str) -> str | None:
    comp, _, path = name.partition(".")
    if comp == "base_model" and path.startswith("model."):       # a bare PEFT U-Net adapter
        return "unet:" + path[len("model."):]
    return _norm(f"{comp}:{path}") if comp in COMPONENTS else None


def _sgm_names(unet_cfg) -> dict[str, str]:
    """Original-layout U-Net module paths with _ for . (SDXL kohya files) -> our module paths."""
    from latentd.model.convert_single_file import RESNET_LEAVES, UNET_PREFIX, unet_table
    out = {}
    for src, dst in unet_table(unet_cfg).items():
        out[src[len(UNET_PREFIX):]] = dst
    leaves = {v: k for k, v in RESNET_LEAVES.items() if k != "nin_shortcut."}
    return {"prefixes": out, "resnet_leaves": leaves}


def _kohya_index(shapes: dict[str, tuple], unet_cfg) -> dict[str, str]:
    """kohya name (without the lora_<part>_ prefix, per component) -> our layer key."""
    index = {}
    sgm = _sgm_names(unet_cfg) if unet_cfg is not None else None
    for key in shapes:
        comp, path = _norm(key).split(":", 1)
        index[f"{comp}:{path.replace('.', '_')}"] = key
        if comp != "unet":
            index[f"{comp}:{(TEXT_MODEL + path).replace('.', '_')}"] = key
        if comp == "unet" and sgm is not None:
            p = path + "."
            for orig, ours in sgm["prefixes"].items():
                if p.startswith(ours):
                    leaf = p[len(ours):]
                    if ".resnets." in ours:
                        leaf = next((leaf.replace(a, b, 1) for a, b in sgm["resnet_leaves"].items()
                                     if leaf.startswith(a)), leaf)
                    index[f"unet:{(orig + leaf).rstrip('.').replace('.', '_')}"] = key
                    break
    return index


def bind(name: str, state: dict[str, torch.Tensor], meta: dict[str, str], shapes: dict[str, tuple],
         family: str, unet_cfg=None, where: str | None = None) -> LoraAdapter:
    """A parsed file -> LoraAdapter for a model with these layer shapes (lora_runtime.layer_shapes)
    and family; raises LoraFormatError naming the file and a layer it cannot place."""
    where = where or name
    fmt, pairs = parse(state, meta, where)
    made_for = family_of(pairs)
    if made_for != family:
        raise LoraFormatError(f"{where}: an adapter for {made_for} models, this model is {family}")
    kindex = _kohya_index(shapes, unet_cfg) if fmt == "kohya" else None
    by_norm = {_norm(k): k for k in shapes}
    layers = {}
    for raw, (down, up, alpha) in pairs.items():
        if fmt == "peft":
            key = by_norm.get(_peft_key(raw) or "")
        else:
            prefix = next((p for p in sorted(KOHYA_PREFIXES, key=len, reverse=True) if raw.startswith(p)), None)
            key = None if prefix is None else kindex.get(f"{KOHYA_PREFIXES[prefix]}:{raw[len(prefix):]}")
        if key is None or key not in shapes:
            raise LoraFormatError(f"{where}: layer {raw!r} is not in this model (an adapter for another base model)")
        w = shapes[key]
        want_down = (down.shape[0], *w[1:]) if down.dim() == 4 else (down.shape[0], w[1])
        if len(w) != down.dim() or tuple(down.shape) != tuple(want_down) or up.shape[0] != w[0]:
            raise LoraFormatError(f"{where}: layer {raw!r} has shapes down {tuple(down.shape)}, up {tuple(up.shape)}; "
                                  f"this model's layer is {tuple(w)} (an adapter for another base model)")
        rank = down.shape[0]
        scale = 1.0 if alpha is None else alpha / rank
        if not math.isfinite(scale):
            raise LoraFormatError(f"{where}: layer {raw!r} has alpha {alpha}")
        layers[key] = LoraLayer(down.float().contiguous(), up.float().contiguous(), scale)
    if not layers:
        raise LoraFormatError(f"{where}: no layers")
    return LoraAdapter(name, layers, family, {"format": fmt})


def save_peft(adapter: LoraAdapter, path: str | Path, metadata: dict | None = None,
              dtype: torch.dtype = torch.float32) -> None:
    """Write the diffusers/PEFT layout with alpha = r (scale 1, what diffusers assumes without
    metadata) in `dtype` (adapters are read back as float32); `metadata` goes in as JSON under
    "latentd"."""
    from safetensors.torch import save_file
    out = {}
    for key, layer in adapter.layers.items():
        comp, path_ = key.split(":", 1)
        base = f"{comp}.{path_}"
        out[base + ".lora_A.weight"] = layer.down.detach().to(dtype).contiguous()
        out[base + ".lora_B.weight"] = layer.up.detach().to(dtype).contiguous()
    meta = {"format": "pt"}
    scales = {layer.scale for layer in adapter.layers.values()}
    if scales != {1.0}:
        raise ValueError("save_peft writes scale-1 layers (alpha = r); fold the scale into up first")
    if metadata:
        meta["latentd"] = json.dumps(metadata, sort_keys=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=meta)


def _text_models(pipe) -> list[tuple[str, object]]:
    text = pipe.conditioner.text
    out = [("text_encoder", text.model)]
    if getattr(text, "model_2", None) is not None:
        out.append(("text_encoder_2", text.model_2))
    return out


def attach_model(pipe) -> dict[str, tuple]:
    """Install the per-row hooks on a pipeline's U-Net and text encoder(s); -> layer shapes."""
    from latentd.model import lora_runtime
    shapes = {}
    for comp, root in [("unet", pipe.unet)] + _text_models(pipe):
        lora_runtime.attach(root, comp)
        shapes |= lora_runtime.layer_shapes(root, comp)
    return shapes


def load(pipe, source, name: str | None = None) -> LoraAdapter:
    """A file path, or (state dict, metadata), bound to a pipeline (Pipeline.load_lora)."""
    if isinstance(source, (str, Path)):
        name = name or Path(source).stem
        state, meta = read(source)
        where = f"{name} ({Path(source).name})"
    else:
        state, meta = source
        name = name or "adapter"
        where = name
    unet_cfg = getattr(pipe.unet, "config", None)
    adapter = bind(name, state, meta, pipe.lora_shapes, pipe.info.family, unet_cfg, where)
    return adapter.to(pipe.device, pipe.dtype)
