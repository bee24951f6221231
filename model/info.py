"""What a model folder allows, read from its JSON configs only (torch-free: the API imports this).

Size rule (explicit): the U-Net halves the latent (len(unet.block_out_channels) - 1) times and the
VAE shrinks pixels by its factor f = 2**(len(vae.block_out_channels) - 1), so width and height
must be multiples of  size_multiple = f * 2**(n_down)  (64 for Stable Diffusion 1.x/2.x: 8 x 8),
which keeps every skip connection the same size. Within that: min side = size_multiple,
max side = 4 x native side, width*height <= max_pixels (default: 4 x native area, i.e. 2x each
side). An SDXL model at its native 1024x1024 allows only SDXL's size buckets (model/family.py
SDXL_SIZES). An optional `latentd.json` in the model folder overrides any of:
    {"name", "sizes": [[w, h], ...] (then ONLY these), "max_pixels", "max_side", "max_steps",
     "default_steps", "default_sampler", "default_guidance", "default_karras",
     "few_step_samplers" (["lcm", "tcd"]: a consistency-distilled model, meant for those),
     "unet_in_channels" (single-file checkpoints only: 9 for an inpainting U-Net)}
("sizes": [] lifts a family's buckets.)

The few-step samplers (model/request.py GRID_SAMPLERS) run on any model, but draw well only on a
model or with an adapter distilled for them: a model accepts them by itself (`standalone_samplers`)
only when its latentd.json lists them in "few_step_samplers"; otherwise a request needs an adapter
whose metadata says it is meant for them (model/lora_catalog.py meant_for; the service's gate:
jobs/request_fewstep.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

from latentd.model.errors import ModelLoadError
from latentd.model.family import default_sizes, family_of
from latentd.model.request import (DEFAULT_GUIDANCE, DEFAULT_KARRAS, DEFAULT_SAMPLER, DEFAULT_STEPS,
                                   GRID_SAMPLERS, KARRAS_SAMPLERS, MAX_GUIDANCE, SAMPLERS)

# The model latentd ships (trained by `latentd train-shapes`), used wherever no model is named.
BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "shapes")
PREDICTION_TYPES = ("epsilon", "v_prediction")
OVERRIDES = "latentd.json"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    native_width: int
    native_height: int
    vae_factor: int                  # pixels per latent cell (8 for SD)
    size_multiple: int               # width/height must be multiples of this (64 for SD)
    max_side: int
    max_pixels: int
    sizes: tuple[tuple[int, int], ...] = ()   # non-empty: only these (w, h) are allowed
    latent_channels: int = 4                 # channels of the latent the chain runs on
    unet_in_channels: int = 4                # 9: an inpainting U-Net (latent + mask + masked image)
    prediction_type: str = "epsilon"         # epsilon | v_prediction
    num_train_timesteps: int = 1000
    max_steps: int = 150
    has_safety: bool = False
    default_steps: int = DEFAULT_STEPS
    default_sampler: str = DEFAULT_SAMPLER
    default_guidance: float = DEFAULT_GUIDANCE
    default_karras: bool = DEFAULT_KARRAS
    samplers: tuple[str, ...] = SAMPLERS
    karras_samplers: tuple[str, ...] = KARRAS_SAMPLERS
    few_step_samplers: tuple[str, ...] = ()  # the GRID_SAMPLERS the model itself is meant for
    max_guidance: float = MAX_GUIDANCE
    # classifier guidance: head -> labels of the model's noise-aware classifier (model/classifier.py);
    # None: the model has none
    classifier: dict | None = field(default=None, compare=False, hash=False)
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    family: str = "sd"                       # "sd" (SD 1.x/2.x) | "sdxl" (model/family.py)

    @property
    def inpaint_unet(self) -> bool:
        """A U-Net conditioned on a mask and masked-image latents (Stable Diffusion inpainting:
        in_channels = latent + 1 + latent)."""
        return self.unet_in_channels == 2 * self.latent_channels + 1

    def size_error(self, width: int, height: int) -> tuple[str, str] | None:
        """(field, message) when width x height is not allowed, else None."""
        if self.sizes:
            if (width, height) not in self.sizes:
                allowed = ", ".join(f"{w}x{h}" for w, h in self.sizes)
                return "width", f"{width}x{height} is not an allowed size; allowed: {allowed}"
            return None
        m = self.size_multiple
        for name, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, int):
                return name, f"must be an integer, got {v!r}"
            if v < m or v > self.max_side or v % m:
                return name, (f"must be a multiple of {m} between {m} and {self.max_side}, got {v}")
        if width * height > self.max_pixels:
            return "width", (f"{width}x{height} = {width * height} pixels exceeds the maximum "
                             f"of {self.max_pixels} pixels")
        return None

    @property
    def standalone_samplers(self) -> tuple[str, ...]:
        """The samplers a request may name on this model without an adapter: every sampler but
        the few-step ones the model is not meant for."""
        return tuple(s for s in self.samplers if s not in GRID_SAMPLERS or s in self.few_step_samplers)

    @property
    def quality_steps(self) -> dict[str, int]:
        """OpenAI's `quality` as step presets of this model: low = half its default steps,
        medium = its default, high = 1.5x (within 1..max_steps)."""
        d = self.default_steps
        return {"low": max(1, (d + 1) // 2), "medium": d,
                "high": max(d, min(self.max_steps, (3 * d + 1) // 2))}

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        d["quality_steps"] = self.quality_steps
        d["sizes"] = [list(s) for s in self.sizes]
        d["samplers"] = list(self.samplers)
        d["karras_samplers"] = list(self.karras_samplers)
        d["few_step_samplers"] = list(self.few_step_samplers)
        d["standalone_samplers"] = list(self.standalone_samplers)
        if self.classifier is not None:
            d["classifier"] = {k: list(v) for k, v in self.classifier.items()}
        return d


def read_json(path: str | os.PathLike) -> dict:
    """A model's JSON config as a dict; ModelLoadError naming the file when it is missing or bad.
    Every config of a model folder is read through here (model/loader.py too)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def maybe_json(path: str | os.PathLike) -> dict | None:
    return read_json(path) if os.path.isfile(path) else None


def overrides_for(source: str | os.PathLike) -> dict:
    """The latentd.json of a model folder, or the one beside a single-file checkpoint ({} if none)."""
    source = os.fspath(source)
    folder = os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else source
    return maybe_json(os.path.join(folder, OVERRIDES)) or {}


def check_prediction_type(pred: str | None) -> str:
    """A scheduler config's prediction_type (None: epsilon), or ModelLoadError if unsupported."""
    pred = pred or "epsilon"
    if pred not in PREDICTION_TYPES:
        raise ModelLoadError(f"scheduler prediction_type {pred!r} is not supported "
                             f"({' | '.join(PREDICTION_TYPES)})")
    return pred


def classifier_heads(folder: str | os.PathLike) -> dict[str, tuple[str, ...]] | None:
    """Head -> labels of the classifier in <folder>/classifier/config.json, None without one."""
    cfg = maybe_json(os.path.join(os.fspath(folder), "classifier", "config.json"))
    if cfg is None:
        return None
    heads = cfg.get("heads")
    if not isinstance(heads, dict) or not all(isinstance(v, list) for v in heads.values()):
        raise ModelLoadError(f"{folder}/classifier/config.json: `heads` must map names to label lists")
    return {str(k): tuple(str(x) for x in v) for k, v in heads.items()}


def read_model_info(folder: str | os.PathLike) -> ModelInfo:
    """ModelInfo for a diffusers-layout folder (or a single-file *.safetensors: SD 1.x defaults,
    overridden by a `latentd.json` next to it). Raises ModelLoadError on missing/corrupt configs."""
    folder = os.fspath(folder)
    if os.path.isfile(folder):
        over = overrides_for(folder)
        base = dict(name=os.path.splitext(os.path.basename(folder))[0], sample_size=64,
                    vae_factor=8, n_down=3, latent_channels=4,
                    unet_in_channels=int(over.get("unet_in_channels", 4)), prediction_type="epsilon",
                    num_train_timesteps=1000, has_safety=False)
        return _build(base, over)
    if not os.path.isdir(folder):
        raise ModelLoadError(f"{folder}: no such model folder or file")
    unet = read_json(os.path.join(folder, "unet", "config.json"))
    vae = read_json(os.path.join(folder, "vae", "config.json"))
    sched = maybe_json(os.path.join(folder, "scheduler", "scheduler_config.json")) or {}
    index = maybe_json(os.path.join(folder, "model_index.json")) or {}
    over = overrides_for(folder)
    safety_entry = index.get("safety_checker", None)
    has_safety = (os.path.isfile(os.path.join(folder, "safety_checker", "config.json"))
                  and not (isinstance(safety_entry, list) and None in safety_entry))
    info = info_from_configs(unet, vae, sched, has_safety=has_safety,
                             name=os.path.basename(os.path.normpath(folder)), overrides=over)
    return replace(info, classifier=classifier_heads(folder))


def info_from_configs(unet: dict, vae: dict, scheduler: dict, *, has_safety: bool, name: str,
                      overrides: dict | None = None) -> ModelInfo:
    """ModelInfo from already-read diffusers config dicts (unet, vae, scheduler) + latentd.json."""
    vae_blocks = vae.get("block_out_channels") or [128, 256, 512, 512]
    unet_blocks = unet.get("block_out_channels") or [320, 640, 1280, 1280]
    sample_size = unet.get("sample_size", 64)
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    base = dict(
        name=name,
        sample_size=int(sample_size),
        vae_factor=2 ** (len(vae_blocks) - 1),
        n_down=len(unet_blocks) - 1,
        latent_channels=int(unet.get("out_channels", 4)),
        unet_in_channels=int(unet.get("in_channels", 4)),
        prediction_type=check_prediction_type(scheduler.get("prediction_type")),
        num_train_timesteps=int(scheduler.get("num_train_timesteps") or 1000),
        has_safety=bool(has_safety),
        family=family_of(unet),
    )
    return _build(base, overrides or {})


def _build(base: dict, over: dict) -> ModelInfo:
    f = base["vae_factor"]
    native = base["sample_size"] * f
    multiple = f * 2 ** base["n_down"]
    max_side = int(over.get("max_side", 4 * native))
    family = base.get("family", "sd")
    sizes = tuple((int(w), int(h)) for w, h in over.get("sizes", default_sizes(family, native)))
    known = {"name", "sizes", "unet_in_channels", "max_pixels", "max_side", "max_steps", "default_steps",
             "default_sampler", "default_guidance", "default_karras", "few_step_samplers"}
    info = ModelInfo(
        name=str(over.get("name", base["name"])),
        native_width=native, native_height=native,
        vae_factor=f, size_multiple=multiple, max_side=max_side,
        max_pixels=int(over.get("max_pixels", 4 * native * native)),
        sizes=sizes,
        latent_channels=base["latent_channels"],
        unet_in_channels=base["unet_in_channels"],
        prediction_type=base["prediction_type"],
        num_train_timesteps=base["num_train_timesteps"],
        max_steps=int(over.get("max_steps", min(150, base["num_train_timesteps"]))),
        has_safety=base["has_safety"],
        default_steps=int(over.get("default_steps", DEFAULT_STEPS)),
        default_sampler=str(over.get("default_sampler", DEFAULT_SAMPLER)),
        default_guidance=float(over.get("default_guidance", DEFAULT_GUIDANCE)),
        default_karras=bool(over.get("default_karras", DEFAULT_KARRAS)),
        few_step_samplers=_few_step(over.get("few_step_samplers", ())),
        extra={k: v for k, v in over.items() if k not in known},
        family=family,
    )
    if info.default_sampler not in SAMPLERS:
        raise ModelLoadError(f"latentd.json: default_sampler {info.default_sampler!r} not in {SAMPLERS}")
    if info.default_sampler not in info.standalone_samplers:
        raise ModelLoadError(f"latentd.json: default_sampler {info.default_sampler!r} is a few-step sampler; "
                             "list it in few_step_samplers if the model is distilled for it")
    if sizes and (native, native) not in sizes:  # native size must be allowed: first listed
        object.__setattr__(info, "native_width", sizes[0][0])
        object.__setattr__(info, "native_height", sizes[0][1])
    return info


def _few_step(value) -> tuple[str, ...]:
    """latentd.json's few_step_samplers: a list of GRID_SAMPLERS."""
    if not isinstance(value, (list, tuple)) or not all(v in GRID_SAMPLERS for v in value):
        raise ModelLoadError(f"latentd.json: few_step_samplers must be a list of {', '.join(GRID_SAMPLERS)}, "
                             f"got {value!r}")
    return tuple(value)
