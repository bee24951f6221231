"""What a LoRA file is, from its safetensors header alone (no torch: the API lists and checks
adapters with it; model/lora_format.py reads the tensors).

An adapter's name is its path under an adapter folder without ".safetensors" ("star",
"styles/ink"). Folders searched, in order: LATENTD_LORA_DIR, then a model folder's own loras/
(the bundled model ships its star adapter there). A file added to a folder is found on the next
lookup: nothing is cached by name here.

An adapter file may say what it is meant for: JSON under the safetensors metadata key "latentd"
(LoraInfo.meta), e.g. a few-step adapter's {"meant_for": {"samplers": ["lcm", "tcd"], "steps":
[1, 8], "default_steps": 4, "guidance_scale": 1.0}}. `meant_for(meta)` reads it; the service lets
a request name a few-step sampler on a model not distilled for it only with such an adapter
(jobs/request_fewstep.py) and lists it (GET /v1/models, /v1/loras).
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from latentd.model.request import SAMPLERS, is_int, is_num

SUFFIX = ".safetensors"
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*$")
MAX_HEADER = 100 * 1024 * 1024
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")    # the model parts an adapter may touch
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
# key fragments of adapter kinds latentd does not run -> their names
OTHER_KINDS = {"hada_w1": "LoHa", "lokr_w1": "LoKr", "lokr_w2": "LoKr", "dora_scale": "DoRA",
               "lora_magnitude_vector": "DoRA", "lora_mid": "LoCon with a CP-decomposed (Tucker) middle",
               "oft_blocks": "OFT", "oft_r": "OFT", "boft_": "BOFT", "ia3_l": "IA3",
               ".diff": "a full weight difference"}
FORMATS = {"peft": (".lora_A.weight", ".lora_B.weight"), "kohya": (".lora_down.weight", ".lora_up.weight")}


class LoraFormatError(ValueError):
    """A LoRA file latentd cannot use: unreadable, another adapter kind, or another base model."""


class UnknownAdapter(LoraFormatError):
    """No adapter of that name in the folders (and no such file)."""


@dataclass(frozen=True)
class LoraInfo:
    """An adapter as listings show it."""

    name: str
    path: str
    format: str                   # "peft" | "kohya"
    family: str                   # "sd" | "sdxl"
    rank: int                     # largest rank of its layers
    layers: int
    components: tuple[str, ...]   # ("unet", "text_encoder", ...)
    kinds: tuple[str, ...]        # ("linear", "conv")
    context_dim: int | None       # the U-Net's cross-attention width it was made for, if it says
    bytes: int
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def meant_for(self) -> dict:
        return meant_for(self.meta)

    def public(self) -> dict:
        return {"name": self.name, "format": self.format, "family": self.family, "rank": self.rank,
                "layers": self.layers, "targets": list(self.components), "kinds": list(self.kinds),
                "context_dim": self.context_dim, "bytes": self.bytes, **({"meta": self.meta} if self.meta else {}),
                **({"meant_for": self.meant_for} if self.meant_for else {})}


def meant_for(meta: dict) -> dict:
    """What an adapter's metadata says it is meant for, the parts of it that are well formed:
    {"samplers": [latentd samplers], "steps": [lo, hi], "default_steps": n, "guidance_scale": g};
    {} when it says nothing usable."""
    raw = meta.get("meant_for") if isinstance(meta, dict) else None
    if not isinstance(raw, dict):
        return {}
    out: dict = {}
    samplers = raw.get("samplers")
    if isinstance(samplers, list) and any(s in SAMPLERS for s in samplers):
        out["samplers"] = [s for s in samplers if s in SAMPLERS]
    steps = raw.get("steps")
    if isinstance(steps, list) and len(steps) == 2 and all(is_int(n) and n >= 1 for n in steps) \
            and steps[0] <= steps[1]:
        out["steps"] = list(steps)
    if is_int(raw.get("default_steps")) and raw["default_steps"] >= 1:
        out["default_steps"] = raw["default_steps"]
    if is_num(raw.get("guidance_scale")) and raw["guidance_scale"] >= 0:
        out["guidance_scale"] = float(raw["guidance_scale"])
    return out


def header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """-> ({tensor name: {"dtype", "shape", ...}}, metadata) from the safetensors header."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER:
                raise ValueError(f"header of {n} bytes")
            doc = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise LoraFormatError(f"{p.name}: not a readable safetensors file ({e})") from None
    if not isinstance(doc, dict):
        raise LoraFormatError(f"{p.name}: not a readable safetensors file (header is not an object)")
    meta = doc.pop("__metadata__", None) or {}
    return doc, meta


def refuse_other_kinds(keys, where: str) -> None:
    for key in keys:
        for frag, kind in OTHER_KINDS.items():
            if frag in key and not key.endswith(".alpha"):
                raise LoraFormatError(f"{where}: {kind} adapters are not supported (key {key!r}); "
                                      "latentd runs LoRA and LoCon")


def format_of(keys, where: str) -> str:
    refuse_other_kinds(keys, where)
    for fmt, (down, _) in FORMATS.items():
        if any(k.endswith(down) for k in keys):
            return fmt
    raise LoraFormatError(f"{where}: no LoRA weights (neither lora_A/lora_B nor lora_down/lora_up keys)")


def component_of(fmt: str, name: str) -> str | None:
    """The model part a layer name belongs to ("unet", "text_encoder", "text_encoder_2")."""
    if fmt == "kohya":
        prefix = next((p for p in sorted(KOHYA_PREFIXES, key=len, reverse=True) if name.startswith(p)), None)
        return None if prefix is None else KOHYA_PREFIXES[prefix]
    comp = name.split(".", 1)[0]
    if comp == "base_model":
        return "unet"
    return comp if comp in COMPONENTS else None


def family_of(names) -> str:
    """"sdxl" when a file names SDXL-only parts, else "sd"."""
    for n in names:
        if n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) or "add_embedding" in n or "label_emb" in n:
            return "sdxl"
    return "sd"


def describe(path: str | Path, name: str) -> LoraInfo:
    """A file's LoraInfo from its header; LoraFormatError if it is not a LoRA latentd runs."""
    p = Path(path)
    tensors, meta = header(p)
    fmt = format_of(tensors, name)
    down_s = FORMATS[fmt][0]
    ranks, comps, kinds, ctx = [], set(), set(), None
    for key, t in tensors.items():
        if not key.endswith(down_s):
            continue
        shape = t.get("shape") or []
        if len(shape) not in (2, 4):
            raise LoraFormatError(f"{name}: {key!r} has shape {shape}")
        ranks.append(int(shape[0]))
        kinds.add("conv" if len(shape) == 4 and shape[2:] != [1, 1] else "linear")
        comp = component_of(fmt, key)
        if comp is None:
            raise LoraFormatError(f"{name}: layer {key!r} belongs to no model part latentd knows")
        comps.add(comp)
        if comp == "unet" and ("attn2.to_k" in key or "attn2_to_k" in key):
            ctx = int(shape[1])
    if not ranks:
        raise LoraFormatError(f"{name}: no layers")
    extra = {}
    if "latentd" in meta:
        try:
            extra = json.loads(meta["latentd"])
        except ValueError:
            extra = {}
    return LoraInfo(name, str(p), fmt, family_of(tensors), max(ranks), len(ranks), tuple(sorted(comps)),
                    tuple(sorted(kinds)), ctx, p.stat().st_size, extra)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name.split("/"):
        raise LoraFormatError(f"adapter name {name!r}: letters, digits, _ . + - and / between folders")
    return name


def folders(model_dir: str | None = None, lora_dir: str | None = None) -> list[Path]:
    """The adapter folders for a model, in lookup order."""
    out = []
    env = lora_dir if lora_dir is not None else os.environ.get("LATENTD_LORA_DIR", "")
    if env:
        out.append(Path(env))
    if model_dir:
        out.append(Path(model_dir) / "loras")
    return out


def find(name: str, dirs: list[Path]) -> Path | None:
    check_name(name)
    for d in dirs:
        p = d / (name + SUFFIX)
        if p.is_file():
            return p
    return None


def locate(name_or_path: str, dirs: list[Path]) -> tuple[str, Path]:
    """(name, file) for an adapter name in the folders, or for a path to a .safetensors file (its
    stem); UnknownAdapter when there is neither."""
    p = Path(name_or_path)
    if p.suffix == SUFFIX and p.is_file():
        return p.stem, p
    found = find(name_or_path, dirs)
    if found is None:
        where = ", ".join(str(d) for d in dirs) or "no adapter folder (set LATENTD_LORA_DIR)"
        raise UnknownAdapter(f"unknown adapter {name_or_path!r} (looked in {where})")
    return name_or_path, found


def listing(dirs: list[Path]) -> dict[str, LoraInfo | LoraFormatError]:
    """Every *.safetensors under the folders (the first folder wins a name), described; a file
    that is not a usable LoRA maps to its error, so a listing shows what is wrong with it."""
    out: dict[str, LoraInfo | LoraFormatError] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*" + SUFFIX)):
            name = p.relative_to(d).as_posix()[: -len(SUFFIX)]
            if name in out or not NAME_RE.match(name):
                continue
            try:
                out[name] = describe(p, name)
            except LoraFormatError as e:
                out[name] = e
    return out
