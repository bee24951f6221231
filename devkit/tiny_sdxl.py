"""A complete, randomly initialised SDXL folder in diffusers' layout, built offline.

make_tiny_sdxl(path) writes what `StableDiffusionXLPipeline.save_pretrained` writes for SDXL base,
with tiny widths: the same block layout (no attention at the first level, more transformer layers
deeper: per level 1, 2, 3 standing in for 1, 2, 10), linear projections, "text_time" added
conditioning, two text encoders (CLIPTextModel and CLIPTextModelWithProjection, of different
widths so their order on the context's channels matters; the second tokenizer pads with "!" as
OpenCLIP's does), the VAE's SDXL latent scale 0.13025, and SDXL's scheduler config. Every
component is diffusers'/transformers' own class, so key names and configs are the real ones; the
same seed gives the same files.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from devkit.tiny_model import SPECIAL, _perturb, tokenizer_files, vae_config, write_tokenizer

HIDDEN, HIDDEN_2, PROJECTION, TIME_DIM = 32, 48, 40, 8      # context 32 + 48, added 40 + 6 x 8

# SDXL base's scheduler_config.json, as its repository ships it (EulerDiscreteScheduler)
SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}


def unet_config() -> dict:
    return dict(block_out_channels=(16, 32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
                cross_attention_dim=HIDDEN + HIDDEN_2, norm_num_groups=8, addition_embed_type="text_time",
                addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=PROJECTION + 6 * TIME_DIM)


def _text_config(hidden: int, act: str, pad: str):
    from transformers import CLIPTextConfig

    vocab, _ = tokenizer_files()
    return CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                          vocab_size=len(vocab), max_position_embeddings=77, projection_dim=PROJECTION,
                          hidden_act=act, bos_token_id=vocab[SPECIAL[0]], eos_token_id=vocab[SPECIAL[1]],
                          pad_token_id=vocab[pad])


def make_tiny_sdxl(path, seed: int = 0) -> Path:
    """Write a tiny random StableDiffusionXLPipeline folder at `path` and return it."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config())
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
    return path


def _write_tokenizer_2(folder: Path) -> None:
    """The byte-level tokenizer with OpenCLIP's padding token "!" (SDXL's tokenizer_2)."""
    write_tokenizer(folder)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        cfg = json.loads((folder / name).read_text())
        cfg["pad_token"] = "!"
        (folder / name).write_text(json.dumps(cfg, indent=2))
