"""A complete, randomly initialised Stable Diffusion folder in diffusers' layout, built offline.

make_tiny_sd(path) writes what `StableDiffusionPipeline.save_pretrained` writes for SD 1.x
("sd1": epsilon prediction, 8 heads, conv projections) or SD 2.x ("sd2": v-prediction, head dim
16 standing in for 64, linear projections), with tiny widths so tests run in seconds. Every
component is diffusers'/transformers' own class, so key names and configs are the real ones. The
tokenizer is shipped as SD repositories ship it (vocab.json + merges.txt), with a byte-level vocab
built here; the same seed gives the same files.

make_single_file(folder, path) writes the same weights as one original-format (CompVis/Stability)
checkpoint: model.diffusion_model.*, first_stage_model.*, and cond_stage_model.transformer.* (SD 1)
or an OpenCLIP cond_stage_model.model.* tower (SD 2).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from latentd.model.config import UNetConfig, VAEConfig
from latentd.model.convert_single_file import RESNET_LEAVES, VAE_ATTN_LEAVES, unet_table, vae_table

SPECIAL = ("<|startoftext|>", "<|endoftext|>")
MERGES = ("t h", "th e</w>", "a n", "an d</w>", "c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>")


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2/CLIP byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def tokenizer_files() -> tuple[dict[str, int], str]:
    """(vocab, merges.txt text) of a tiny CLIP byte-level BPE."""
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in MERGES] + list(SPECIAL)
    merges = "#version: 0.2\n" + "\n".join(MERGES) + "\n"
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: Path, max_length: int = 77) -> None:
    """vocab.json + merges.txt + tokenizer_config.json + special_tokens_map.json, like SD repos."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_files()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text(merges)
    special = {"bos_token": SPECIAL[0], "eos_token": SPECIAL[1], "unk_token": SPECIAL[1], "pad_token": SPECIAL[1]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
         "errors": "replace", "add_prefix_space": False, **special}, indent=2))


def unet_config(variant: str = "sd1") -> dict:
    cfg = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=32)
    if variant == "sd1":
        cfg["attention_head_dim"] = 8                                   # SD 1.x: 8 heads everywhere
    else:
        cfg.update(attention_head_dim=(2, 4), use_linear_projection=True)   # heads = channels / 16
    return cfg


def vae_config() -> dict:
    # four levels, so that latents are H/8 x W/8 as in Stable Diffusion
    return dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                sample_size=64, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)


def scheduler(variant: str = "sd1"):
    from diffusers import DDIMScheduler, PNDMScheduler

    common = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    if variant == "sd1":
        return PNDMScheduler(skip_prk_steps=True, prediction_type="epsilon", **common)
    return DDIMScheduler(clip_sample=False, prediction_type="v_prediction", **common)


def _perturb(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.02) -> None:
    """Add small noise to every parameter, so zero-initialised layers (conv_out, proj_out, ...)
    carry signal and a wrong wiring cannot hide behind a zero."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def make_tiny_sd(path, variant: str = "sd1", safety: bool = True, seed: int = 0,
                 in_channels: int = 4) -> Path:
    """Write a tiny random StableDiffusionPipeline folder at `path` and return it. in_channels=9:
    an inpainting U-Net (latent + mask + masked-image latent, as Stable Diffusion inpainting)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if variant not in ("sd1", "sd2"):
        raise ValueError(f"variant must be sd1 or sd2, not {variant!r}")
    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**unet_config(variant), "in_channels": in_channels})
    vae = AutoencoderKL(**vae_config())
    vocab, _ = tokenizer_files()
    text_cfg = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                              vocab_size=len(vocab), max_position_embeddings=77, projection_dim=32,
                              hidden_act="quick_gelu" if variant == "sd1" else "gelu",
                              bos_token_id=vocab[SPECIAL[0]], eos_token_id=vocab[SPECIAL[1]],
                              pad_token_id=vocab[SPECIAL[1]])
    text_encoder = CLIPTextModel(text_cfg)
    for m in (unet, vae, text_encoder):
        _perturb(m, gen)

    tok_dir = path / "tokenizer"
    write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    safety_checker = feature_extractor = None
    if safety:
        clip_cfg = CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                             vocab_size=len(vocab), bos_token_id=vocab[SPECIAL[0]],
                             eos_token_id=vocab[SPECIAL[1]], pad_token_id=vocab[SPECIAL[1]]),
            vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                               image_size=32, patch_size=4, num_channels=3),
            projection_dim=32)
        safety_checker = StableDiffusionSafetyChecker(clip_cfg).eval()
        _perturb(safety_checker, gen)
        with torch.no_grad():   # random concept directions instead of the all-ones default
            safety_checker.concept_embeds.copy_(torch.randn(safety_checker.concept_embeds.shape, generator=gen))
            safety_checker.special_care_embeds.copy_(
                torch.randn(safety_checker.special_care_embeds.shape, generator=gen))
        feature_extractor = CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
            do_normalize=True, do_resize=True, do_convert_rgb=True, resample=3,
            image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])

    return save_sd_folder(path, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                          scheduler=scheduler(variant), safety_checker=safety_checker,
                          feature_extractor=feature_extractor)


def save_sd_folder(path: Path, *, safety_checker=None, feature_extractor=None, **components) -> Path:
    """Write diffusers components (vae, text_encoder, tokenizer, unet, scheduler, [safety_checker,
    feature_extractor]) as an SD repository folder, tokenizer in the SD layout."""
    from diffusers import StableDiffusionPipeline

    safety = safety_checker is not None
    pipe = StableDiffusionPipeline(**components, safety_checker=safety_checker,
                                   feature_extractor=feature_extractor, requires_safety_checker=safety)
    pipe.save_pretrained(path, safe_serialization=True)
    tok_dir = path / "tokenizer"
    shutil.rmtree(tok_dir)            # what transformers wrote -> the SD repository layout instead
    write_tokenizer(tok_dir)
    if safety:                        # without torchvision transformers records its PIL fallback
        index = json.loads((path / "model_index.json").read_text())
        index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
        (path / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


# -- the same weights as an original single-file checkpoint --------------------------------------
# diffusers ships only the original -> diffusers direction, so the file is written with the
# inverse of our table and then *validated by diffusers' own converter* (convert_ldm_*): if our
# table were wrong, diffusers would not map the file back onto the folder's weights.

def to_original_names(state, table, prefix_out, leaves_back, vae=False):
    """Our (diffusers) names -> original names, by the inverse of a convert_single_file table."""
    inv = sorted(((ours, orig) for orig, ours in table.items()), key=lambda p: len(p[0]), reverse=True)
    out = {}
    for key, value in state.items():
        ours, orig = next(((o, g) for o, g in inv if key.startswith(o)), (None, None))
        if ours is None:
            out[prefix_out + key] = value
            continue
        leaf = key[len(ours):]
        for a, b in leaves_back(ours).items():
            if leaf.startswith(a):
                leaf = b + leaf[len(a):]
                if vae and value.ndim == 2 and "attentions" in ours:
                    value = value[:, :, None, None]
                break
        out[orig + leaf] = value
    return out


def unet_leaves(prefix):
    """Inverse leaf renames inside a U-Net block starting at our `prefix`."""
    return {v: k for k, v in RESNET_LEAVES.items() if k != "nin_shortcut."} if ".resnets." in prefix else {}


def vae_leaves(prefix):
    """Inverse leaf renames inside a VAE block starting at our `prefix`."""
    if ".resnets." in prefix:
        return {"conv_shortcut.": "nin_shortcut."}
    return {v: k for k, v in VAE_ATTN_LEAVES.items()} if "attentions" in prefix else {}


def _text_original(text_state):
    return {"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in text_state.items()}


def _open_clip_original(text_state, hidden):
    """SD 2.x layout: OpenCLIP names, fused q/k/v, plus a last block that SD 2 does not use."""
    s = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    p = "cond_stage_model.model."
    out = {p + "token_embedding.weight": s["embeddings.token_embedding.weight"],
           p + "positional_embedding": s["embeddings.position_embedding.weight"],
           p + "ln_final.weight": s["final_layer_norm.weight"], p + "ln_final.bias": s["final_layer_norm.bias"],
           p + "text_projection": torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(0)),
           p + "logit_scale": torch.tensor(4.6)}
    n = 1 + max(int(k.split(".")[2]) for k in s if k.startswith("encoder.layers."))
    for i in range(n + 1):                      # block n: the unused 24th layer of OpenCLIP ViT-H
        src, dst = f"encoder.layers.{min(i, n - 1)}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + "attn.in_proj_" + kind] = torch.cat(
                [s[f"{src}self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                         ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{b}.{kind}"] = s[f"{src}{a}.{kind}"]
    return out


def make_single_file(folder, out_path):
    """The folder's U-Net, VAE and text encoder in one original-format safetensors file."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    ucfg = UNetConfig.from_diffusers(json.loads((folder / "unet" / "config.json").read_text()))
    vcfg = VAEConfig.from_diffusers(json.loads((folder / "vae" / "config.json").read_text()))
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(folder / "text_encoder" / "model.safetensors")
    state = to_original_names(unet, unet_table(ucfg), "model.diffusion_model.", unet_leaves)
    state |= to_original_names(vae, vae_table(vcfg), "first_stage_model.", vae_leaves, vae=True)
    sd2 = ucfg.use_linear_projection
    state |= _open_clip_original(text, ucfg.cross_attention_dim) if sd2 else _text_original(text)
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)         # schedule buffers real files carry
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(out_path))
    return out_path
