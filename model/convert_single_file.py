"""Original (CompVis / Stability) single-file Stable Diffusion key names -> our (= diffusers') names.

The tables are generated from the config: level i of the U-Net with L layers per block is
input_blocks[(L+1)*i + j + 1] in the original and down_blocks[i].resnets/attentions[j] here, and so
on. Inside a transformer block the names already agree; inside ResNet and VAE attention blocks a
handful of leaf names differ (RESNET_LEAVES, VAE_ATTN_LEAVES).

Where each part lives in the file is one small table per family (PARTS): SD keeps its text encoder
under cond_stage_model (SD 1.x a transformers CLIPTextModel, SD 2.x an OpenCLIP tower); SDXL keeps
two under conditioner.embedders: 0 is CLIP ViT-L in transformers' layout, 1 is OpenCLIP ViT-bigG in
open_clip's (fused q/k/v, ln_final, a (D, P) text_projection applied as x @ P, i.e. the transpose of
transformers' Linear weight). SDXL's added embedding is the U-Net's label_emb.0.{0,2}.
"""
from __future__ import annotations

import re

import torch

from latentd.model.config import UNetConfig, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."     # SD 1.x: a transformers CLIPTextModel
OPEN_CLIP_PREFIX = "cond_stage_model.model."      # SD 2.x: an OpenCLIP text tower

# family -> text-encoder component -> (layout, prefix in the single file)
PARTS = {
    "sd": {"text_encoder": ("clip_or_open_clip", "cond_stage_model.")},
    "sdxl": {"text_encoder": ("clip", "conditioner.embedders.0.transformer."),
             "text_encoder_2": ("open_clip", "conditioner.embedders.1.model.")},
}
SDXL_UNET = {"label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2."}
# OpenCLIP tower -> transformers CLIPTextModel names (outside the per-layer blocks)
OPEN_CLIP_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                 "positional_embedding": "text_model.embeddings.position_embedding.weight",
                 "ln_final.weight": "text_model.final_layer_norm.weight",
                 "ln_final.bias": "text_model.final_layer_norm.bias"}
OPEN_CLIP_LEAVES = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
                    "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}

RESNET_LEAVES = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
                 "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut.",
                 "nin_shortcut.": "conv_shortcut."}
VAE_ATTN_LEAVES = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}


def unet_table(cfg: UNetConfig) -> dict[str, str]:
    """Original prefix -> our prefix for every block of the U-Net."""
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    t = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
         "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
         "middle_block.0.": "mid_block.resnets.0.", "middle_block.1.": "mid_block.attentions.0.",
         "middle_block.2.": "mid_block.resnets.1."}
    if cfg.addition_embed_type == "text_time":
        t |= SDXL_UNET
    for i in range(n):
        for j in range(L):
            t[f"input_blocks.{(L + 1) * i + j + 1}.0."] = f"down_blocks.{i}.resnets.{j}."
            t[f"input_blocks.{(L + 1) * i + j + 1}.1."] = f"down_blocks.{i}.attentions.{j}."
        if i < n - 1:
            t[f"input_blocks.{(L + 1) * (i + 1)}.0.op."] = f"down_blocks.{i}.downsamplers.0.conv."
        for j in range(L + 1):
            t[f"output_blocks.{(L + 1) * i + j}.0."] = f"up_blocks.{i}.resnets.{j}."
            t[f"output_blocks.{(L + 1) * i + j}.1."] = f"up_blocks.{i}.attentions.{j}."
        if i < n - 1:
            has_attn = cfg.down_attention[n - 1 - i]
            t[f"output_blocks.{(L + 1) * i + L}.{2 if has_attn else 1}.conv."] = f"up_blocks.{i}.upsamplers.0.conv."
    return {UNET_PREFIX + k: v for k, v in t.items()}


def vae_table(cfg: VAEConfig) -> dict[str, str]:
    """Original prefix -> our prefix for every block of the autoencoder."""
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    t = {"encoder.norm_out.": "encoder.conv_norm_out.", "decoder.norm_out.": "decoder.conv_norm_out."}
    for part in ("encoder", "decoder"):
        t[f"{part}.mid.block_1."] = f"{part}.mid_block.resnets.0."
        t[f"{part}.mid.attn_1."] = f"{part}.mid_block.attentions.0."
        t[f"{part}.mid.block_2."] = f"{part}.mid_block.resnets.1."
    for i in range(n):
        for j in range(L):
            t[f"encoder.down.{i}.block.{j}."] = f"encoder.down_blocks.{i}.resnets.{j}."
        t[f"encoder.down.{i}.downsample.conv."] = f"encoder.down_blocks.{i}.downsamplers.0.conv."
        for j in range(L + 1):   # the original counts decoder levels from the bottom
            t[f"decoder.up.{n - 1 - i}.block.{j}."] = f"decoder.up_blocks.{i}.resnets.{j}."
        t[f"decoder.up.{n - 1 - i}.upsample.conv."] = f"decoder.up_blocks.{i}.upsamplers.0.conv."
    return {VAE_PREFIX + k: v for k, v in t.items()}


def _convert(state: dict[str, torch.Tensor], prefix: str, table: dict[str, str]) -> dict[str, torch.Tensor]:
    """Keys under `prefix`, renamed by the longest matching table prefix; unmatched keys keep their
    original name (minus `prefix`) so the strict check reports them."""
    by_len = sorted(table, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        src = next((p for p in by_len if key.startswith(p)), None)
        if src is None:
            out[key[len(prefix):]] = value
            continue
        dst, leaf = table[src], key[len(src):]
        if ".resnets." in dst:
            leaf = next((leaf.replace(a, b, 1) for a, b in RESNET_LEAVES.items() if leaf.startswith(a)), leaf)
        elif dst.endswith("mid_block.attentions.0.") and prefix == VAE_PREFIX:
            leaf = next((leaf.replace(a, b, 1) for a, b in VAE_ATTN_LEAVES.items() if leaf.startswith(a)), leaf)
            if value.ndim == 4:            # 1x1 convolutions in the original, Linear here
                value = value[:, :, 0, 0]
        out[dst + leaf] = value
    return out


def convert_unet(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    return _convert(state, UNET_PREFIX, unet_table(cfg))


def convert_vae(state: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    return _convert(state, VAE_PREFIX, vae_table(cfg))


def convert_clip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel stored under `prefix` (SD 1.x, SDXL's first encoder): the
    names already agree; text_model.* is ensured and the old position_ids buffer dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefix) and not key.endswith("position_ids"):
            k = key[len(prefix):]
            out[k if k.startswith("text_model.") else "text_model." + k] = value
    return out


def convert_open_clip(state: dict[str, torch.Tensor], prefix: str, num_layers: int,
                      projection: bool = False) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower under `prefix` as transformers names it. Blocks from `num_layers` on
    are dropped (SD 2.x runs 23 of its 24); the fused attn.in_proj (3D, ...) is split into q, k, v.
    projection (SDXL's bigG): text_projection (D, P) becomes CLIPTextModelWithProjection's
    text_projection.weight (P, D); otherwise it is not used. logit_scale is never used."""
    out = {}
    block = re.compile(r"transformer\.resblocks\.(\d+)\.(.*)")
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix):]
        if k in OPEN_CLIP_TOP:
            out[OPEN_CLIP_TOP[k]] = value
        elif k == "text_projection":
            if projection:
                out["text_projection.weight"] = value.T.contiguous()
        elif (m := block.fullmatch(k)) is not None:
            i, leaf = int(m.group(1)), m.group(2)
            if i >= num_layers:
                continue
            dst = f"text_model.encoder.layers.{i}."
            if leaf.startswith("attn.in_proj_"):             # fused (3*D, ...) -> q, k, v
                kind = leaf[len("attn.in_proj_"):]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{dst}self_attn.{name}.{kind}"] = part
            else:
                src = next((a for a in OPEN_CLIP_LEAVES if leaf.startswith(a)), None)
                out[dst + (OPEN_CLIP_LEAVES[src] + leaf[len(src):] if src else leaf)] = value
        elif k != "logit_scale":
            out["text_model." + k] = value                       # unknown: the strict check names it
    return out


def convert_text_encoder(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """SD 1.x/2.x: the text encoder as transformers' CLIPTextModel names it, from a CLIPTextModel
    (CLIP_PREFIX) or else an OpenCLIP tower (OPEN_CLIP_PREFIX) of which SD 2.x uses `num_layers`
    (the text_encoder config's num_hidden_layers, 23 of 24: its penultimate layer)."""
    return convert_clip(state, CLIP_PREFIX) or convert_open_clip(state, OPEN_CLIP_PREFIX, num_layers)


def convert_text_part(state: dict[str, torch.Tensor], family: str, part: str,
                      num_layers: int) -> dict[str, torch.Tensor]:
    """Text-encoder component `part` of a `family` single file (PARTS), in transformers' names."""
    layout, prefix = PARTS[family][part]
    if layout == "clip":
        return convert_clip(state, prefix)
    if layout == "open_clip":
        return convert_open_clip(state, prefix, num_layers, projection=True)
    return convert_text_encoder(state, num_layers)


def infer_unet_config(state: dict[str, torch.Tensor]) -> UNetConfig:
    """U-Net shape from an original checkpoint's tensors. Heads are not in the weights: context
    width 768 means SD 1.x (8 heads per level), otherwise SD 2.x (head dim 64)."""
    p = UNET_PREFIX
    idx = [int(m.group(1)) for k in state if (m := re.match(re.escape(p) + r"input_blocks\.(\d+)\.", k))]
    ops = sorted(int(m.group(1)) for k in state if (m := re.match(re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.", k)))
    if not idx or not ops:
        raise ValueError("no U-Net (model.diffusion_model.input_blocks.*) in the checkpoint")
    L = ops[0] - 1
    n = (max(idx) + 1) // (L + 1)
    chs = tuple(state[f"{p}input_blocks.{(L + 1) * i + 1}.0.out_layers.3.weight"].shape[0] for i in range(n))
    attn = tuple(f"{p}input_blocks.{(L + 1) * i + 1}.1.proj_in.weight" in state for i in range(n))
    proj = state[f"{p}middle_block.1.proj_in.weight"]
    ctx = state[f"{p}middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    tl = len({k.split(".")[4] for k in state if k.startswith(f"{p}middle_block.1.transformer_blocks.")})
    sd1 = ctx == 768
    return UNetConfig(block_out_channels=chs, down_attention=attn, layers_per_block=L, transformer_layers=tl,
                      num_heads=tuple(8 if sd1 else c // 64 for c in chs),
                      in_channels=state[f"{p}input_blocks.0.0.weight"].shape[1],
                      out_channels=state[f"{p}out.2.weight"].shape[0], cross_attention_dim=ctx,
                      use_linear_projection=proj.ndim == 2, sample_size=64 if sd1 else 96)


def infer_vae_config(state: dict[str, torch.Tensor], sample_size: int = 512) -> VAEConfig:
    """VAE shape from an original checkpoint's tensors; GroupNorm's 32 groups and the 0.18215
    latent scale are not in the weights and are SD's (give config_dir/vae/config.json otherwise)."""
    p = VAE_PREFIX + "encoder.down."
    levels = sorted({int(k[len(p):].split(".")[0]) for k in state if k.startswith(p)})
    if not levels:
        raise ValueError("no VAE (first_stage_model.encoder.down.*) in the checkpoint")
    chs = tuple(state[f"{p}{i}.block.0.conv1.weight"].shape[0] for i in levels)
    L = len({k[len(p):].split(".")[2] for k in state if k.startswith(f"{p}0.block.")})
    return VAEConfig(block_out_channels=chs, layers_per_block=L, sample_size=sample_size,
                     latent_channels=state[VAE_PREFIX + "post_quant_conv.weight"].shape[0])
