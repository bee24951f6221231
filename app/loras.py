"""LoRA adapters as the API sees them, torch-free (model/lora_catalog.py reads a file's header).

A model's adapters are the *.safetensors files under LATENTD_LORA_DIR, then under its folder's
loras/; the folders are read on every request, so a file added there is usable at once. An
adapter is usable by a model when it is a LoRA latentd runs, made for the model's family
(sd | sdxl) and, when both say so, for its U-Net's cross-attention width. Admission checks every
adapter a request names here (a 422 naming `loras` or `prompt` and the adapter); the worker that
runs the job loads it (model/lora_library.py) and fails that job alone if it cannot. What an
adapter's metadata says it is meant for (model/lora_catalog.py meant_for) is listed with it and
lets a request name a few-step sampler the model is not distilled for (jobs/request_fewstep.py).
"""
from __future__ import annotations

import functools
import os

from latentd.jobs.models import ModelEntry
from latentd.model import lora_catalog
from latentd.model.info import ModelInfo, maybe_json
from latentd.model.lora_catalog import LoraFormatError, LoraInfo


def folders(entry: ModelEntry, settings) -> list:
    model_dir = entry.source if os.path.isdir(entry.source) else None
    return lora_catalog.folders(model_dir, settings.lora_dir or "")


@functools.lru_cache(maxsize=64)
def context_dim(source: str) -> int | None:
    """The cross-attention width of a model folder's U-Net; None when the API cannot read it."""
    try:
        cfg = maybe_json(os.path.join(source, "unet", "config.json")) if os.path.isdir(source) else None
    except ValueError:
        return None
    dim = (cfg or {}).get("cross_attention_dim")
    dim = dim[0] if isinstance(dim, (list, tuple)) and dim else dim
    return int(dim) if isinstance(dim, int) else None


def problem(lora: LoraInfo, entry: ModelEntry, info: ModelInfo | None) -> str | None:
    """Why `lora` cannot run on the model, or None (a model not known yet is not judged)."""
    if info is None:
        return None
    if lora.family != info.family:
        return f"was made for {lora.family} models; model {entry.name!r} is {info.family}"
    ctx = context_dim(entry.source)
    if ctx and lora.context_dim and lora.context_dim != ctx:
        return (f"was made for a U-Net with cross-attention width {lora.context_dim}; model "
                f"{entry.name!r} has {ctx}")
    return None


class Checker:
    """One request's adapter checks on a model: `check(name)` -> None, or why the model cannot
    use that adapter (jobs/request_loras.py); `meant_for()` -> {name: what it is meant for} of the
    model's adapters whose metadata says so (the few-step gate, jobs/request_fewstep.py)."""

    def __init__(self, entry: ModelEntry, info: ModelInfo, settings):
        self.entry, self.info, self.settings = entry, info, settings
        self.dirs = folders(entry, settings)

    def __call__(self, name: str) -> str | None:
        entry = self.entry
        try:
            path = lora_catalog.find(name, self.dirs)
            if path is None:
                return f"unknown adapter {name!r} (GET /v1/loras?model={entry.name} lists them)"
            why = problem(lora_catalog.describe(path, name), entry, self.info)
        except LoraFormatError as e:
            return f"adapter {name!r} cannot be used: {e}"
        return None if why is None else f"adapter {name!r} {why}"

    def meant_for(self) -> dict[str, dict]:
        return {lo.name: lo.meant_for for lo in usable(self.entry, self.info, self.settings) if lo.meant_for}


def checker(entry: ModelEntry, info: ModelInfo, settings) -> Checker:
    """The adapter checks admission passes to the resolver (its lora_check)."""
    return Checker(entry, info, settings)


def usable(entry: ModelEntry, info: ModelInfo | None, settings) -> list[LoraInfo]:
    """The adapters the model can use, by name."""
    return [lo for lo in lora_catalog.listing(folders(entry, settings)).values()
            if isinstance(lo, LoraInfo) and problem(lo, entry, info) is None]


def catalog(models: list[tuple[ModelEntry, ModelInfo | None]], settings) -> list[dict]:
    """Every adapter file of the models' folders: what it is (LoraInfo.public), the models that
    can use it and why the others cannot, or, for a file latentd cannot use, its error."""
    items: dict[str, dict] = {}
    for entry, info in models:
        for name, lo in lora_catalog.listing(folders(entry, settings)).items():
            if isinstance(lo, LoraFormatError):
                items.setdefault(name, {"name": name, "file": name + lora_catalog.SUFFIX,
                                        "error": str(lo), "compatible": []})
                continue
            item = items.setdefault(name, {**lo.public(), "file": name + lora_catalog.SUFFIX,
                                           "compatible": [], "incompatible": {}})
            why = problem(lo, entry, info)
            if "error" in item:
                continue
            if why is None:
                item["compatible"].append(entry.name)
            else:
                item["incompatible"][entry.name] = why
    return sorted(items.values(), key=lambda d: d["name"])
