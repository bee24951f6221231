"""Frozen configs for the U-Net and the VAE, read from / written to diffusers' config.json.

Only the architectures Stable Diffusion 1.x/2.x and SDXL use are supported: a UNet2DConditionModel
with CrossAttn/plain down and up blocks, a cross-attention mid block, positional (sinusoidal) time
embedding, optionally SDXL's "text_time" added conditioning and per-level transformer depths; an
AutoencoderKL with DownEncoder/UpDecoder blocks. Anything else is refused with a
ValueError naming the field, so a checkpoint never loads into the wrong network silently.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

_UNET_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}   # type -> has attention
_UNET_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
DIFFUSERS_VERSION = "0.30.0"   # written into saved configs; any diffusers >= 0.30 reads them


def _tuple(value: Any, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def _require(cfg: dict, key: str, allowed: tuple, default: Any) -> None:
    value = cfg.get(key, default)
    if value not in allowed:
        raise ValueError(f"unsupported U-Net/VAE config: {key}={value!r} (supported: {allowed})")


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the denoising U-Net (Rombach et al. 2022, §3.3; architecture of Ho et al. 2020)."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_attention: tuple[bool, ...] = (True, True, True, False)   # per down level (up: reversed)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)                      # attention heads per down level
    layers_per_block: int = 2
    transformer_layers: int | tuple[int, ...] = 1   # per level (an int: the same everywhere); mid: last
    in_channels: int = 4
    out_channels: int = 4
    cross_attention_dim: int = 768
    use_linear_projection: bool = False    # SD 2.x: Linear proj_in/proj_out instead of 1x1 conv
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    sample_size: int = 64                  # native latent size (pixels / 8)
    dropout: float = 0.0
    # SDXL (Podell et al. 2023, §2.2): "text_time" adds an embedding of [pooled text, sinusoidal
    # embeddings of the size/crop micro-conditioning] to the time embedding; None: SD 1.x/2.x
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None             # per micro-conditioning number
    projection_class_embeddings_input_dim: int | None = None   # pooled width + ids x the above

    def __post_init__(self):
        n = len(self.block_out_channels)
        layers = _tuple(self.transformer_layers, n)
        if len(layers) != n:
            raise ValueError(f"transformer_layers has {len(layers)} entries for {n} levels")
        object.__setattr__(self, "transformer_layers", tuple(int(x) for x in layers))

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "UNetConfig":
        """Read a diffusers UNet2DConditionModel config.json (a dict)."""
        down, up = tuple(cfg["down_block_types"]), tuple(cfg["up_block_types"])
        n = len(cfg["block_out_channels"])
        for t in down:
            if t not in _UNET_DOWN:
                raise ValueError(f"unsupported U-Net config: down block type {t!r}")
        for t in up:
            if t not in _UNET_UP:
                raise ValueError(f"unsupported U-Net config: up block type {t!r}")
        down_attn = tuple(_UNET_DOWN[t] for t in down)
        if tuple(_UNET_UP[t] for t in reversed(up)) != down_attn or len(down) != n:
            raise ValueError(f"unsupported U-Net config: up blocks {up} do not mirror down blocks {down}")
        _require(cfg, "mid_block_type", ("UNetMidBlock2DCrossAttn",), "UNetMidBlock2DCrossAttn")
        _require(cfg, "act_fn", ("silu",), "silu")
        _require(cfg, "time_embedding_type", ("positional",), "positional")
        _require(cfg, "resnet_time_scale_shift", ("default",), "default")
        _require(cfg, "class_embed_type", (None,), None)
        _require(cfg, "addition_embed_type", (None, "text_time"), None)
        _require(cfg, "reverse_transformer_layers_per_block", (None,), None)
        _require(cfg, "encoder_hid_dim", (None,), None)
        _require(cfg, "center_input_sample", (False,), False)
        _require(cfg, "downsample_padding", (1,), 1)
        _require(cfg, "mid_block_scale_factor", (1, 1.0), 1)
        _require(cfg, "dual_cross_attention", (False,), False)
        _require(cfg, "only_cross_attention", (False,), False)
        _require(cfg, "conv_in_kernel", (3,), 3)
        _require(cfg, "conv_out_kernel", (3,), 3)
        # diffusers' naming quirk (huggingface/diffusers#2011): for SD configs `attention_head_dim` is the number
        # of heads per block; `num_attention_heads`, when present, takes precedence.
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        layers = _tuple(cfg.get("layers_per_block", 2), n)
        tlayers = _tuple(cfg.get("transformer_layers_per_block", 1), n)
        xdim = _tuple(cfg.get("cross_attention_dim", 768), n)
        if len(set(layers)) != 1 or len(set(xdim)) != 1 or any(not isinstance(x, int) for x in tlayers):
            raise ValueError("unsupported U-Net config: per-block layers_per_block or cross_attention_dim, "
                             "or per-layer transformer_layers_per_block")
        added = cfg.get("addition_embed_type")
        if added == "text_time" and not (cfg.get("addition_time_embed_dim")
                                         and cfg.get("projection_class_embeddings_input_dim")):
            raise ValueError("U-Net config: addition_embed_type 'text_time' needs addition_time_embed_dim "
                             "and projection_class_embeddings_input_dim")
        return cls(
            block_out_channels=tuple(cfg["block_out_channels"]),
            down_attention=down_attn,
            num_heads=_tuple(heads, n),
            layers_per_block=int(layers[0]),
            transformer_layers=tuple(int(x) for x in tlayers),
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            cross_attention_dim=int(xdim[0]),
            use_linear_projection=bool(cfg.get("use_linear_projection", False)),
            upcast_attention=bool(cfg.get("upcast_attention", False)),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
            freq_shift=cfg.get("freq_shift", 0),
            sample_size=cfg.get("sample_size", 64),
            dropout=cfg.get("dropout", 0.0),
            addition_embed_type=added,
            addition_time_embed_dim=cfg.get("addition_time_embed_dim") if added else None,
            projection_class_embeddings_input_dim=cfg.get("projection_class_embeddings_input_dim") if added else None,
        )

    def to_diffusers(self) -> dict:
        """The config.json diffusers' UNet2DConditionModel writes for this network."""
        tl = self.transformer_layers
        out = {
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": DIFFUSERS_VERSION,
            "act_fn": "silu",
            "attention_head_dim": list(self.num_heads),   # heads, per diffusers' quirk
            "block_out_channels": list(self.block_out_channels),
            "center_input_sample": False,
            "cross_attention_dim": self.cross_attention_dim,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.down_attention],
            "downsample_padding": 1,
            "dropout": self.dropout,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "in_channels": self.in_channels,
            "layers_per_block": self.layers_per_block,
            "mid_block_scale_factor": 1,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "norm_eps": self.norm_eps,
            "norm_num_groups": self.norm_num_groups,
            "out_channels": self.out_channels,
            "sample_size": self.sample_size,
            "transformer_layers_per_block": tl[0] if len(set(tl)) == 1 else list(tl),
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.down_attention)],
            "upcast_attention": self.upcast_attention,
            "use_linear_projection": self.use_linear_projection,
        }
        if self.addition_embed_type is not None:
            out.update(addition_embed_type=self.addition_embed_type,
                       addition_time_embed_dim=self.addition_time_embed_dim,
                       projection_class_embeddings_input_dim=self.projection_class_embeddings_input_dim)
        return out


@dataclass(frozen=True)
class VAEConfig:
    """Shape of the KL autoencoder of latent diffusion (Rombach et al. 2022, §3.1)."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215        # z = E(x) * scale (Rombach et al. 2022, §4.3.2)
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "VAEConfig":
        """Read a diffusers AutoencoderKL config.json (a dict)."""
        n = len(cfg["block_out_channels"])
        for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(cfg.get(key, (allowed,) * n))
            if len(types) != n or any(t != allowed for t in types):
                raise ValueError(f"unsupported VAE config: {key}={types}")
        _require(cfg, "act_fn", ("silu",), "silu")
        if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
            raise ValueError("unsupported VAE config: latents_mean/latents_std")
        return cls(
            block_out_channels=tuple(cfg["block_out_channels"]),
            layers_per_block=cfg.get("layers_per_block", 1),
            in_channels=cfg.get("in_channels", 3),
            out_channels=cfg.get("out_channels", 3),
            latent_channels=cfg.get("latent_channels", 4),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            sample_size=cfg.get("sample_size", 512),
            scaling_factor=cfg.get("scaling_factor", 0.18215),
            shift_factor=cfg.get("shift_factor"),
            use_quant_conv=bool(cfg.get("use_quant_conv", True)),
            use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
            force_upcast=bool(cfg.get("force_upcast", True)),
        )

    def to_diffusers(self) -> dict:
        """The config.json diffusers' AutoencoderKL writes for this network."""
        n = len(self.block_out_channels)
        out = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
               "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
        out.update(asdict(self))
        out["block_out_channels"] = list(self.block_out_channels)
        return out
