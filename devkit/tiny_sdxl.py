"""A complete, randomly initialised SDXL folder in diffusers' layout, built offline.

make_tiny_sdxl(path) writes what `StableDiffusionXLPipeline.save_pretrained` writes for SDXL base,
with tiny widths: the same block layout (no attention at the first level, more transformer layers
deeper: per level 1, 2, 3 standing in for 1, 2, 10), linear projections, "text_time" added
conditioning, two text encoders (CLIPTextModel and CLIPTextModelWithProjection, of different
widths so their order on the context's channels matters; the second tokenizer pads with "!" as
OpenCLIP's does), the VAE's SDXL latent scale 0.13025, and SDXL's scheduler config. Every
component is diffusers'/transformers' own class, so key names and configs are the real ones; the
same seed gives the same files. in_channels=9 makes an SDXL inpainting U-Net; aesthetics=True a
model that takes an aesthetic score in its micro-conditioning (requires_aesthetics_score, as SDXL's
refiner; both encoders kept).

make_sdxl_single_file(folder, path) writes the same weights as one original-format SDXL checkpoint
(sd_xl_base_1.0.safetensors' layout): model.diffusion_model.* (label_emb for the added embedding),
first_stage_model.*, conditioner.embedders.0.transformer.* (CLIP-L as transformers names it) and
conditioner.embedders.1.model.* (OpenCLIP bigG as open_clip names it).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from devkit.tiny_model import (SPECIAL, _perturb, tokenizer_files, to_original_names, unet_leaves, vae_config,
                               vae_leaves, write_tokenizer)

HIDDEN, HIDDEN_2, PROJECTION, TIME_DIM = 32, 48, 40, 8      # context 32 + 48, added 40 + 6 x 8

# SDXL base's scheduler_config.json, as its repository ships it (EulerDiscreteScheduler)
SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}


def unet_config(in_channels: int = 4, aesthetics: bool = False) -> dict:
    ids = 5 if aesthetics else 6
    return dict(block_out_channels=(16, 32, 64), layers_per_block=2, sample_size=8, in_channels=in_channels,
                out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
                cross_attention_dim=HIDDEN + HIDDEN_2, norm_num_groups=8, addition_embed_type="text_time",
                addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=PROJECTION + ids * TIME_DIM)


def _text_config(hidden: int, act: str, pad: str):
    from transformers import CLIPTextConfig

    vocab, _ = tokenizer_files()
    return CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                          vocab_size=len(vocab), max_position_embeddings=77, projection_dim=PROJECTION,
                          hidden_act=act, bos_token_id=vocab[SPECIAL[0]], eos_token_id=vocab[SPECIAL[1]],
                          pad_token_id=vocab[pad])


def make_tiny_sdxl(path, seed: int = 0, in_channels: int = 4, aesthetics: bool = False) -> Path:
    """Write a tiny random StableDiffusionXLPipeline folder at `path` and return it."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(in_channels, aesthetics))
    vae = AutoencoderKL(**vae_config(), scaling_factor=0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(_text_config(HIDDEN, "quick_gelu", SPECIAL[1]))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(HIDDEN_2, "gelu", "!"))
    for m in (unet, vae, text_encoder, text_encoder_2):
        _perturb(m, gen)
    write_tokenizer(path / "tokenizer")
    _write_tokenizer_2(path / "tokenizer_2")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(path / "tokenizer_2"),
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(SCHEDULER), force_zeros_for_empty_prompt=True,
        add_watermarker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    for name, write in (("tokenizer", write_tokenizer), ("tokenizer_2", _write_tokenizer_2)):
        shutil.rmtree(path / name)          # what transformers wrote -> the SD repository layout
        write(path / name)
    (path / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", **SCHEDULER},
                   indent=2, sort_keys=True) + "\n")
    if aesthetics:
        index = json.loads((path / "model_index.json").read_text())
        index["requires_aesthetics_score"] = True
        (path / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


def _open_clip_bigg(text_state: dict, prefix: str) -> dict:
    """A transformers CLIPTextModelWithProjection state in open_clip's names (fused q/k/v; the
    projection as a (D, P) matrix applied as x @ P)."""
    s = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    out = {prefix + "token_embedding.weight": s["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": s["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": s["final_layer_norm.weight"], prefix + "ln_final.bias": s["final_layer_norm.bias"],
           prefix + "text_projection": s["text_projection.weight"].T.contiguous(),
           prefix + "logit_scale": torch.tensor(4.6)}
    n = 1 + max(int(k.split(".")[2]) for k in s if k.startswith("encoder.layers."))
    for i in range(n):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + "attn.in_proj_" + kind] = torch.cat([s[f"{src}self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                         ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{b}.{kind}"] = s[f"{src}{a}.{kind}"]
    return out


def make_sdxl_single_file(folder, out_path) -> Path:
    """The SDXL folder's U-Net, VAE and both text encoders in one original-format safetensors file."""
    from safetensors.torch import load_file, save_file

    from latentd.model.config import UNetConfig, VAEConfig
    from latentd.model.convert_single_file import PARTS, unet_table, vae_table

    folder = Path(folder)
    ucfg = UNetConfig.from_diffusers(json.loads((folder / "unet" / "config.json").read_text()))
    vcfg = VAEConfig.from_diffusers(json.loads((folder / "vae" / "config.json").read_text()))
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    state = to_original_names(unet, unet_table(ucfg), "model.diffusion_model.", unet_leaves)
    state |= to_original_names(vae, vae_table(vcfg), "first_stage_model.", vae_leaves, vae=True)
    clip_prefix = PARTS["sdxl"]["text_encoder"][1]
    for k, v in load_file(folder / "text_encoder" / "model.safetensors").items():
        state[clip_prefix + (k if k.startswith("text_model.") else "text_model." + k)] = v
    state |= _open_clip_bigg(load_file(folder / "text_encoder_2" / "model.safetensors"),
                             PARTS["sdxl"]["text_encoder_2"][1])
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(out_path))
    return Path(out_path)


def _write_tokenizer_2(folder: Path) -> None:
    """The byte-level tokenizer with OpenCLIP's padding token "!" (SDXL's tokenizer_2)."""
    write_tokenizer(folder)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        cfg = json.loads((folder / name).read_text())
        cfg["pad_token"] = "!"
        (folder / name).write_text(json.dumps(cfg, indent=2))
