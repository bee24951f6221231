"""Our U-Net and VAE against diffusers' on the same random weights."""
import pytest
import torch

from latentd.model.config import UNetConfig, VAEConfig
from latentd.model.loader import load_unet, load_vae
from latentd.model.unet import UNet
from latentd.model.weights import save_module

TOL = 1e-4


def _diffusers(folder):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return (UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
            AutoencoderKL.from_pretrained(folder / "vae").eval())


@pytest.fixture(params=["sd1", "sd2"])
def model_folder(request, tiny_model, tiny_model_sd2):
    return tiny_model if request.param == "sd1" else tiny_model_sd2


def test_config_reads_diffusers_head_quirk(tiny_model, tiny_model_sd2):
    from latentd.model.loader import read_json

    sd1 = UNetConfig.from_diffusers(read_json(tiny_model / "unet" / "config.json"))
    sd2 = UNetConfig.from_diffusers(read_json(tiny_model_sd2 / "unet" / "config.json"))
    assert sd1.num_heads == (8, 8) and not sd1.use_linear_projection
    assert sd2.num_heads == (2, 4) and sd2.use_linear_projection      # head dim 16 at 32 and 64 channels
    assert sd1.down_attention == (True, False)


@torch.no_grad()
def test_unet_matches_diffusers(model_folder):
    ref, _ = _diffusers(model_folder)
    ours, _ = load_unet(model_folder / "unet")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)                  # (B, 4, h, w)
    t = torch.tensor([999, 500, 1])                           # a different timestep per sample
    ctx = torch.randn(3, 77, 32, generator=g)                 # (B, L, D)
    expected = ref(x, t, ctx).sample
    got = ours(x, t, ctx)
    assert got.shape == expected.shape == x.shape
    assert (got - expected).abs().max().item() <= TOL
    assert expected.abs().max().item() > 0.1                 # a real signal, not zeros
    # per-sample timesteps are honoured: sample 0 alone equals sample 0 of the batch
    assert (ours(x[:1], t[:1], ctx[:1]) - got[:1]).abs().max().item() <= TOL
    # odd latent sizes (skip and upsampled sizes differ) and a scalar timestep
    x2 = torch.randn(2, 4, 9, 7, generator=g)
    assert (ours(x2, torch.tensor(10), ctx[:2]) - ref(x2, 10, ctx[:2]).sample).abs().max().item() <= TOL
    # the CPU default stores convolutions channels-last; the plain layout gives the same result
    plain, _ = load_unet(model_folder / "unet", channels_last=False)
    assert plain.conv_in.weight.is_contiguous() and not ours.conv_in.weight.is_contiguous()
    assert (plain(x, t, ctx) - expected).abs().max().item() <= TOL


@torch.no_grad()
def test_vae_matches_diffusers(model_folder):
    _, ref = _diffusers(model_folder)
    ours, cfg = load_vae(model_folder / "vae")
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 8, 8, generator=g)                  # (B, 4, H/8, W/8)
    img = ours.decode(z)
    assert img.shape == (2, 3, 64, 64)
    assert (img - ref.decode(z).sample).abs().max().item() <= TOL
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    mean, logvar = ours.encode(x)
    dist = ref.encode(x).latent_dist
    assert (mean - dist.mean).abs().max().item() <= TOL
    assert (logvar - dist.logvar).abs().max().item() <= TOL
    assert cfg.scaling_factor == ref.config.scaling_factor


def test_saved_module_loads_in_diffusers(tmp_path):
    """What a training run saves with save_module is a folder diffusers itself loads."""
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import UNet2DConditionModel

    from latentd.model.vae import AutoencoderKL

    torch.manual_seed(0)
    ucfg = UNetConfig(block_out_channels=(32, 64), down_attention=(False, True), num_heads=(2, 4),
                      cross_attention_dim=16, use_linear_projection=True, sample_size=8)
    unet = UNet(ucfg)
    save_module(unet, ucfg.to_diffusers(), tmp_path / "unet")
    ref = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert UNetConfig.from_diffusers(dict(ref.config)) == ucfg
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 16)
    with torch.no_grad():
        assert (unet.eval()(x, t, ctx) - ref(x, t, ctx).sample).abs().max().item() <= TOL

    vcfg = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae = AutoencoderKL(vcfg)
    save_module(vae, vcfg.to_diffusers(), tmp_path / "vae")
    vref = DAutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert VAEConfig.from_diffusers(dict(vref.config)) == vcfg
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert (vae.eval().decode(z) - vref.decode(z).sample).abs().max().item() <= TOL


def test_unet_trains_with_and_without_checkpointing():
    """Gradients flow to every parameter, and activation checkpointing gives the same gradients."""
    torch.manual_seed(0)
    cfg = UNetConfig(block_out_channels=(32, 32), down_attention=(True, False), num_heads=(4, 4),
                     cross_attention_dim=8, layers_per_block=1, sample_size=4)
    unet = UNet(cfg).train()
    x, t, ctx = torch.randn(2, 4, 4, 4), torch.tensor([5, 900]), torch.randn(2, 3, 8)
    grads = []
    for ckpt in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = ckpt
        unet(x, t, ctx).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters()})
    assert all(g.abs().sum() > 0 for g in grads[0].values())
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_unsupported_config_is_refused():
    bad = UNetConfig().to_diffusers() | {"class_embed_type": "timestep"}
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_diffusers(bad)
    other_blocks = {"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}
    with pytest.raises(ValueError, match="down block type"):
        UNetConfig.from_diffusers(UNetConfig().to_diffusers() | other_blocks)
