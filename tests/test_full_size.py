"""The full-size SD 1.5 architecture: random weights written by diffusers, so
every key name and shape is the real one; loaded by us; one U-Net call at 512x512 equals diffusers'.

Memory: one copy of the 860M-parameter U-Net (3.4 GB float32) is alive at a time — diffusers'
runs and is freed before ours is loaded from the saved folder.
"""
import gc

import pytest
import torch

from latentd.model.config import UNetConfig, VAEConfig
from latentd.model.convert_single_file import infer_unet_config, infer_vae_config, unet_table, vae_table
from latentd.model.loader import load_unet, load_vae
from devkit.sd15 import SD15_UNET, SD_VAE
from devkit.tiny_model import to_original_names, unet_leaves, vae_leaves

pytestmark = pytest.mark.slow


def _meta(module):
    """The module's state as meta tensors: names and shapes without a copy of the weights."""
    return {k: torch.empty(v.shape, device="meta") for k, v in module.state_dict().items()}


def test_sd15_unet_full_size(tmp_path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = UNet2DConditionModel(**SD15_UNET).eval()
    ref.save_pretrained(tmp_path / "unet", safe_serialization=True)
    n_params = sum(p.numel() for p in ref.parameters())
    assert n_params > 850_000_000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g)           # 512x512 latents, a CFG-sized batch of 2
    t = torch.tensor([981, 1])
    ctx = torch.randn(2, 77, 768, generator=g)           # (B, 77, 768) CLIP ViT-L/14 states
    with torch.inference_mode():
        expected = ref(x, t, ctx).sample
    del ref
    gc.collect()

    ours, cfg = load_unet(tmp_path / "unet")
    assert cfg == UNetConfig.from_diffusers(SD15_UNET) and cfg.num_heads == (8, 8, 8, 8)
    assert sum(p.numel() for p in ours.parameters()) == n_params
    with torch.inference_mode():
        got = ours(x, t, ctx)
    diff = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert diff <= 1e-3 * max(1.0, scale), (diff, scale)

    # the same network under the original single-file names: shapes alone give back the config
    original = to_original_names(_meta(ours), unet_table(cfg), "model.diffusion_model.", unet_leaves)
    assert infer_unet_config(original) == cfg


def test_sd_vae_full_size(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    ref = AutoencoderKL(**SD_VAE).eval()
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
    ours, cfg = load_vae(tmp_path / "vae")
    assert cfg == VAEConfig.from_diffusers(SD_VAE)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))   # 128x128 to save time
    with torch.inference_mode():
        diff = (ours.decode(z) - ref.decode(z).sample).abs().max().item()
    assert diff <= 1e-4
    original = to_original_names(_meta(ours), vae_table(cfg), "first_stage_model.", vae_leaves, vae=True)
    assert infer_vae_config(original) == cfg
