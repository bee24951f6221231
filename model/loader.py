"""Loading a Stable Diffusion model: a diffusers folder, a single-file checkpoint, or a hub id.

    load_components(source, device, dtype, config_dir=None, safety=True) -> Components

Sources:
- a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/, [safety_checker/,
  feature_extractor/], model_index.json) with *.safetensors weights; an SDXL folder (a U-Net
  with addition_embed_type "text_time") has text_encoder_2/ (CLIPTextModelWithProjection) and
  tokenizer_2/ besides;
- a single-file original checkpoint `*.safetensors` (model.diffusion_model.*, first_stage_model.*,
  cond_stage_model.*; SDXL: conditioner.embedders.{0,1}.* and the U-Net's label_emb.*, the tables of
  model/convert_single_file.py). Its U-Net/VAE/text-encoder weights come from the file; what a checkpoint does
  not hold (tokenizer, text-encoder and scheduler configs, safety checker) comes from `config_dir`,
  a diffusers folder of the same family (weights of its unet/vae/text_encoder are not needed and
  not read). If config_dir has unet/config.json or vae/config.json they are used (and checked
  against the file's shapes; the U-Net's input channels are the file's, so an inpainting fine-tune
  loads with its base model's configs); otherwise the U-Net/VAE shapes are inferred from the
  tensors (SD 1.x/2.x only: an SDXL file needs config_dir/unet/config.json). Without
  config_dir a single file is refused, naming what is missing: a checkpoint alone does not say
  whether it predicts eps or v, nor carry a tokenizer;
- a hub id ("owner/name"), fetched with huggingface_hub.snapshot_download (safetensors and configs
  only) — only when the caller names one and no local path of that name exists.

Weights are read with safetensors only; pickles are refused (model.weights.CONVERT_HINT). Any
problem raises ModelLoadError naming the file and, for weight mismatches, the keys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from latentd.model.config import UNetConfig, VAEConfig
from latentd.model.added_cond import time_ids
from latentd.model.convert_single_file import (PARTS, UNET_PREFIX, convert_text_part, convert_unet, convert_vae,
                                               infer_unet_config, infer_vae_config)
from latentd.model.errors import ModelLoadError
from latentd.model.info import ModelInfo, classifier_heads, info_from_configs, maybe_json, overrides_for, read_json
from latentd.model.unet import UNet
from latentd.model.vae import AutoencoderKL
from latentd.model.weights import (PICKLE_SUFFIXES, VAE_DIFFUSERS_RENAMES, check_state, load_into, read_safetensors,
                           refuse_pickle, rename)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                     "diffusion_pytorch_model.fp16.safetensors")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "model.fp16.safetensors")


@dataclass
class Components:
    unet: UNet
    unet_config: UNetConfig
    vae: AutoencoderKL
    vae_config: VAEConfig
    text_encoder: Any                         # transformers CLIPTextModel
    tokenizer: Any                            # transformers CLIPTokenizer
    safety_state: dict[str, torch.Tensor] | None   # safety_checker/ weights (None: no checker / off)
    safety_config: Any                        # transformers CLIPConfig of the checker, or None
    feature_extractor_config: dict | None     # feature_extractor/preprocessor_config.json
    scheduler_config: dict                    # scheduler/scheduler_config.json
    model_index: dict                         # model_index.json ({} for a single file without one)
    name: str
    info: ModelInfo                           # what the model allows (model/info.py), from the same configs
    folder: Path | None = None                # the model folder (None: a single-file checkpoint)
    text_encoder_2: Any = None                # SDXL: transformers CLIPTextModelWithProjection
    tokenizer_2: Any = None                   # SDXL: its CLIPTokenizer


def _info(unet_cfg: UNetConfig, vae_cfg: VAEConfig, scheduler: dict, safety_state, name: str,
          source: Path, folder: Path | None) -> ModelInfo:
    """The ModelInfo of what was loaded: the configs as read, latentd.json beside the weights, and
    the classifier's heads (model folders only)."""
    info = info_from_configs(unet_cfg.to_diffusers(), vae_cfg.to_diffusers(), scheduler,
                             has_safety=safety_state is not None, name=name, overrides=overrides_for(source))
    return replace(info, classifier=classifier_heads(folder)) if folder is not None else info


def find_weights(folder: Path, names=DIFFUSERS_WEIGHTS) -> Path:
    """The safetensors weights file of a component folder; pickles refused, absence named."""
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: folder not found")
    for name in names:
        if (folder / name).is_file():
            return folder / name
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        refuse_pickle(pickles[0])
    raise ModelLoadError(f"{folder}: no weights file (looked for {', '.join(names)})")


def _config(cls, cfg: dict, where: Path):
    try:
        return cls.from_diffusers(cfg)
    except (KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{where}: {e}") from None


def load_unet(folder_or_state, device="cpu", dtype=torch.float32, config: UNetConfig | None = None,
              source: str = "state dict", channels_last: bool | None = None) -> tuple[UNet, UNetConfig]:
    """U-Net from a diffusers unet/ folder, or from a state dict with our names plus its config.

    channels_last (default: on the CPU and CUDA) stores the convolution weights NHWC, so activations
    flow channels-last: ~10% faster CPU convolutions, cuDNN's NHWC tensor-core kernels in half
    precision, and no layout copies around the transformers."""
    if isinstance(folder_or_state, dict):
        state = folder_or_state
    else:
        folder = Path(folder_or_state)
        config = _config(UNetConfig, read_json(folder / "config.json"), folder / "config.json")
        source = find_weights(folder)
        state = read_safetensors(source)
    if config is None:
        raise ModelLoadError("load_unet: a state dict needs its UNetConfig")
    unet = load_into(lambda: UNet(config), state, source, device, dtype)
    if channels_last if channels_last is not None else torch.device(device).type in ("cpu", "cuda"):
        unet = unet.to(memory_format=torch.channels_last)
    return unet, config


def load_vae(folder_or_state, device="cpu", dtype=torch.float32, config: VAEConfig | None = None,
             source: str = "state dict") -> tuple[AutoencoderKL, VAEConfig]:
    """VAE from a diffusers vae/ folder, or from a state dict with our names plus its config."""
    if isinstance(folder_or_state, dict):
        state = folder_or_state
    else:
        folder = Path(folder_or_state)
        config = _config(VAEConfig, read_json(folder / "config.json"), folder / "config.json")
        source = find_weights(folder)
        state = rename(read_safetensors(source), VAE_DIFFUSERS_RENAMES)
    if config is None:
        raise ModelLoadError("load_vae: a state dict needs its VAEConfig")
    return load_into(lambda: AutoencoderKL(config), state, source, device, dtype), config


def _build_hf(model_cls, config):
    """A transformers model without spending time on a random init we overwrite anyway."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:                       # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        return model_cls(config)


def _fit_prefix(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """SD repositories name text-encoder weights text_model.*; transformers 5 writes them without
    the prefix. Match whichever the installed CLIPTextModel expects (keys the model has as they
    are, e.g. CLIPTextModelWithProjection's text_projection.weight, stay); drop the old position_ids."""
    keys = set(model.state_dict())
    want = any(k.startswith("text_model.") for k in keys)
    out = {}
    for k, v in state.items():
        if k.endswith("embeddings.position_ids"):
            continue
        has = k.startswith("text_model.")
        if k not in keys:
            k = ("text_model." + k) if want and not has else (k[len("text_model."):] if has and not want else k)
        out[k] = v
    return out


def _text_encoder_from_state(config_folder: Path, state, source, device, dtype, projection: bool = False):
    """CLIPTextModel (projection: CLIPTextModelWithProjection, SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    read_json(config_folder / "config.json")          # a clear error if missing or broken
    try:
        cfg = CLIPTextConfig.from_pretrained(config_folder)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{config_folder / 'config.json'}: not a CLIP text config ({e})") from None
    model = _build_hf(CLIPTextModelWithProjection if projection else CLIPTextModel, cfg)
    state = _fit_prefix(state, model)
    check_state(model, state, source)
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def load_text_encoder(folder, device="cpu", dtype=torch.float32, projection: bool = False):
    """transformers CLIPTextModel (projection: CLIPTextModelWithProjection) from a diffusers
    text_encoder/ folder (safetensors only)."""
    folder = Path(folder)
    source = find_weights(folder, TRANSFORMERS_WEIGHTS)
    return _text_encoder_from_state(folder, read_safetensors(source), source, device, dtype, projection)


def load_tokenizer(folder):
    """CLIPTokenizer from vocab.json + merges.txt (SD repositories) or tokenizer.json (transformers 5)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: tokenizer folder not found")
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe and not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(f"{folder}: no tokenizer files (need vocab.json + merges.txt, or tokenizer.json)")
    try:
        return CLIPTokenizer.from_pretrained(folder)
    except Exception as e:                            # tokenizers raises its own exception types
        raise ModelLoadError(f"{folder}: cannot load the CLIP tokenizer ({type(e).__name__}: {e})") from None


def load_safety(folder) -> tuple[dict[str, torch.Tensor], Any]:
    """(state dict, transformers CLIPConfig) of diffusers' StableDiffusionSafetyChecker in `folder`."""
    from transformers import CLIPConfig

    folder = Path(folder)
    source = find_weights(folder, TRANSFORMERS_WEIGHTS)
    read_json(folder / "config.json")
    try:
        config = CLIPConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder / 'config.json'}: not a CLIP config ({e})") from None
    return read_safetensors(source), config


def resolve(source: str | Path) -> Path:
    """A local path, or a hub id fetched (safetensors and configs only) when no such path exists."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if isinstance(source, str) and HUB_ID.match(source) and not source.startswith("."):
        from huggingface_hub import snapshot_download

        try:
            # weights only inside component folders: hub repositories also keep the whole model as
            # single-file checkpoints at their root (SDXL base: another 7 GB), which are not read
            return Path(snapshot_download(source, allow_patterns=["*.json", "*.txt", "*/*.safetensors"],
                                          ignore_patterns=["*.fp16.safetensors", "*non_ema*", "*.ckpt"]))
        except Exception as e:
            raise ModelLoadError(f"{source}: no such local path, and fetching it as a hub model failed "
                                 f"({type(e).__name__}: {e})") from None
    raise ModelLoadError(f"{source}: model not found (neither a folder, a .safetensors file, nor a hub id)")


def _safety(folder: Path, want: bool):
    if not want or not (folder / "safety_checker").is_dir():
        return None, None
    return load_safety(folder / "safety_checker")


def load_components(source, device="cpu", dtype=torch.float32, config_dir=None, safety: bool = True) -> Components:
    path = resolve(source)
    if path.is_file():
        return _load_single_file(path, device, dtype, config_dir, safety)
    if not (path / "unet").is_dir():
        refuse_pickle(path)
        raise ModelLoadError(f"{path}: not a diffusers Stable Diffusion folder (no unet/ subfolder)")
    unet, unet_cfg = load_unet(path / "unet", device, dtype)
    vae, vae_cfg = load_vae(path / "vae", device, dtype)
    text_encoder = load_text_encoder(path / "text_encoder", device, dtype)
    text_encoder_2 = tokenizer_2 = None
    if unet_cfg.addition_embed_type == "text_time":          # SDXL: the second encoder
        text_encoder_2 = load_text_encoder(path / "text_encoder_2", device, dtype, projection=True)
        tokenizer_2 = load_tokenizer(path / "tokenizer_2")
        check_sdxl_widths(path, unet_cfg, text_encoder.config, text_encoder_2.config,
                          time_ids(maybe_json(path / "model_index.json") or {}))
    safety_state, safety_cfg = _safety(path, safety)
    scheduler = read_json(path / "scheduler" / "scheduler_config.json")
    name = str(source) if not Path(str(source)).exists() else path.name
    return Components(
        unet=unet, unet_config=unet_cfg, vae=vae, vae_config=vae_cfg,
        text_encoder=text_encoder, tokenizer=load_tokenizer(path / "tokenizer"),
        safety_state=safety_state, safety_config=safety_cfg,
        feature_extractor_config=maybe_json(path / "feature_extractor" / "preprocessor_config.json"),
        scheduler_config=scheduler, model_index=maybe_json(path / "model_index.json") or {}, name=name,
        info=_info(unet_cfg, vae_cfg, scheduler, safety_state, name, path, path), folder=path,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def check_sdxl_widths(path: Path, unet_cfg: UNetConfig, text_cfg, text_cfg_2, n_ids: int) -> None:
    """The U-Net's context width is the two encoders' widths together, and its added-embedding
    input the pooled width plus the micro-conditioning's Fourier features (n_ids numbers: 6, or 5
    with an aesthetic score, model/added_cond.py): a mismatch would only surface as a shape error
    at the first step."""
    context = text_cfg.hidden_size + text_cfg_2.hidden_size
    added = text_cfg_2.projection_dim + n_ids * unet_cfg.addition_time_embed_dim
    if unet_cfg.cross_attention_dim != context:
        raise ModelLoadError(f"{path / 'unet' / 'config.json'}: cross_attention_dim {unet_cfg.cross_attention_dim} "
                             f"is not the text encoders' widths {text_cfg.hidden_size} + {text_cfg_2.hidden_size}")
    if unet_cfg.projection_class_embeddings_input_dim != added:
        raise ModelLoadError(f"{path / 'unet' / 'config.json'}: projection_class_embeddings_input_dim "
                             f"{unet_cfg.projection_class_embeddings_input_dim} is not text_encoder_2's "
                             f"projection_dim {text_cfg_2.projection_dim} + {n_ids} x addition_time_embed_dim "
                             f"{unet_cfg.addition_time_embed_dim}")


def _load_single_file(path: Path, device, dtype, config_dir, safety: bool) -> Components:
    refuse_pickle(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path}: a single-file checkpoint must be a .safetensors file")
    state = read_safetensors(path)
    if config_dir is None:
        raise ModelLoadError(
            f"{path}: a single-file checkpoint holds no tokenizer, text-encoder config or scheduler "
            "config; pass config_dir= a diffusers folder of the same family (e.g. the SD 1.5, SD 2.1 or "
            "SDXL base repository's configs and tokenizers; its unet/vae/text_encoder weights are not needed)")
    cdir = resolve(config_dir)
    sdxl = UNET_PREFIX + "label_emb.0.0.weight" in state
    unet_json = cdir / "unet" / "config.json"
    if sdxl and not unet_json.is_file():
        raise ModelLoadError(f"{path}: an SDXL checkpoint (label_emb) needs its U-Net config: {unet_json} not found "
                             "(config_dir= the SDXL repository's configs)")
    try:
        ucfg = _config(UNetConfig, read_json(unet_json), unet_json) if unet_json.is_file() else infer_unet_config(state)
        vcfg = (_config(VAEConfig, read_json(cdir / "vae" / "config.json"), cdir / "vae" / "config.json")
                if (cdir / "vae" / "config.json").is_file() else infer_vae_config(state, 8 * ucfg.sample_size))
        conv_in = state[UNET_PREFIX + "input_blocks.0.0.weight"]
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot read the model's shape from the checkpoint ({e})") from None
    # an inpainting fine-tune (9 input channels) loads with its base model's configs
    ucfg = replace(ucfg, in_channels=int(conv_in.shape[1]))
    family = "sdxl" if ucfg.addition_embed_type == "text_time" else "sd"
    if family == "sdxl" and not sdxl:
        raise ModelLoadError(f"{path}: {unet_json} describes an SDXL U-Net but the checkpoint has no "
                             f"{UNET_PREFIX}label_emb.* (not an SDXL checkpoint?)")
    index = maybe_json(cdir / "model_index.json") or {}
    # every part renamed first, then built and checked: a bad key anywhere fails before any is used
    parts = {"unet": convert_unet(state, ucfg), "vae": convert_vae(state, vcfg)}
    text_cfgs = {}
    for part in PARTS[family]:
        text_cfgs[part] = read_json(cdir / part / "config.json")
        parts[part] = convert_text_part(state, family, part, int(text_cfgs[part].get("num_hidden_layers", 12)))
        if not parts[part]:
            raise ModelLoadError(f"{path}: no {part} ({PARTS[family][part][1]}*) in the checkpoint")
    del state
    unet, _ = load_unet(parts.pop("unet"), device, dtype, ucfg, source=str(path))
    vae, _ = load_vae(parts.pop("vae"), device, dtype, vcfg, source=str(path))
    text_encoder = _text_encoder_from_state(cdir / "text_encoder", parts.pop("text_encoder"), path, device, dtype)
    text_encoder_2 = tokenizer_2 = None
    if family == "sdxl":
        text_encoder_2 = _text_encoder_from_state(cdir / "text_encoder_2", parts.pop("text_encoder_2"), path,
                                                  device, dtype, projection=True)
        tokenizer_2 = load_tokenizer(cdir / "tokenizer_2")
        check_sdxl_widths(cdir, ucfg, text_encoder.config, text_encoder_2.config, time_ids(index))
    safety_state, safety_cfg = _safety(cdir, safety)
    scheduler = read_json(cdir / "scheduler" / "scheduler_config.json")
    return Components(
        unet=unet, unet_config=ucfg, vae=vae, vae_config=vcfg, text_encoder=text_encoder,
        tokenizer=load_tokenizer(cdir / "tokenizer"), safety_state=safety_state, safety_config=safety_cfg,
        feature_extractor_config=maybe_json(cdir / "feature_extractor" / "preprocessor_config.json"),
        scheduler_config=scheduler, model_index=index, name=path.stem,
        info=_info(ucfg, vcfg, scheduler, safety_state, path.stem, path, None),
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
