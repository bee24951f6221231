"""Noise-aware latent classifier p_phi(y | z_t, t) for classifier guidance (Dhariwal & Nichol 2021,
"Diffusion Models Beat GANs", §4 and App. D: the U-Net's encoder half with the timestep embedding,
then a pooled head). Here: ResNet blocks with the sinusoidal time embedding at each level of the
latent, the last feature map average-pooled to a small grid, and one linear head per attribute (e.g. color / shape /
background of the bundled shapes model), so a request may steer any subset of them.

Input is the variance-preserving latent z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps — what the
U-Net sees — at (possibly fractional) timestep t.

Stored as <model>/classifier/{config.json, model.safetensors}; loaders of the other components
ignore the folder (model_index.json does not list it).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from latentd.model.resnet import Downsample, ResnetBlock
from latentd.model.unet import TimestepMLP, timestep_embedding

WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class ClassifierConfig:
    heads: dict[str, tuple[str, ...]] = field(default_factory=dict)   # head -> class labels
    in_channels: int = 4
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    norm_num_groups: int = 8
    sample_size: int = 16
    pool: int = 4           # the last feature map is pooled to pool x pool and flattened: shape
                            # needs where things are, which a global average would throw away

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    def to_json(self) -> dict:
        d = asdict(self)
        d["heads"] = {k: list(v) for k, v in self.heads.items()}
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ClassifierConfig":
        return cls(heads={k: tuple(v) for k, v in d["heads"].items()}, in_channels=int(d["in_channels"]),
                   block_out_channels=tuple(d["block_out_channels"]), norm_num_groups=int(d["norm_num_groups"]),
                   sample_size=int(d["sample_size"]), pool=int(d.get("pool", 1)))


class LatentClassifier(nn.Module):
    """(B, C, h, w) latent z_t, (B,) timesteps -> {head: (B, n_classes) logits}."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.block_out_channels
        temb, g = cfg.time_embed_dim, cfg.norm_num_groups
        self.time_embedding = TimestepMLP(ch[0], temb)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        prev = ch[0]
        for i, c in enumerate(ch):
            self.blocks.append(ResnetBlock(prev, c, temb, g, 1e-5))
            self.downs.append(Downsample(c) if i < len(ch) - 1 else nn.Identity())
            prev = c
        self.norm_out = nn.GroupNorm(g, prev)
        self.heads = nn.ModuleDict({k: nn.Linear(prev * cfg.pool ** 2, len(v)) for k, v in cfg.heads.items()})

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.time_embedding(timestep_embedding(t, self.cfg.block_out_channels[0]))   # (B, temb)
        h = self.conv_in(z)                                                                 # (B, C0, h, w)
        for block, down in zip(self.blocks, self.downs):
            h = down(block(h, emb))                                 # (B, Ci, h/2^i, w/2^i)
        h = F.adaptive_avg_pool2d(F.silu(self.norm_out(h)), self.cfg.pool).flatten(1)   # (B, C_last * pool^2)
        return {k: head(h) for k, head in self.heads.items()}


def save_classifier(clf: LatentClassifier, folder: str | Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**clf.cfg.to_json(), **(extra or {})}, indent=2,
                                                   sort_keys=True) + "\n")
    save_file({k: v.detach().contiguous() for k, v in clf.state_dict().items()}, str(folder / WEIGHTS),
              metadata={"format": "pt"})


def load_classifier(folder: str | Path, device="cpu") -> LatentClassifier | None:
    """The model's classifier, or None when the model has none (a classifier/ folder)."""
    from latentd.model.weights import load_into, read_safetensors
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return None
    cfg = ClassifierConfig.from_json(json.loads((folder / "config.json").read_text()))
    return load_into(lambda: LatentClassifier(cfg), read_safetensors(folder / WEIGHTS), folder / WEIGHTS,
                     device).requires_grad_(False)


def log_prob_grad(clf: LatentClassifier, z: torch.Tensor, t: torch.Tensor,
                  targets: dict[str, int]) -> torch.Tensor:
    """grad_z sum_h log p_phi(y_h | z, t) for ONE request: z (1, C, h, w), t (1,), targets
    {head: class index}. Computed one request at a time so that a guided request's gradient does
    not depend on what else shares its batch (batch invariance on the CPU)."""
    with torch.enable_grad():
        z = z.detach().float().requires_grad_(True)
        logits = clf(z, t.float())
        logp = sum(F.log_softmax(logits[h], dim=-1)[:, y].sum() for h, y in targets.items())
        (grad,) = torch.autograd.grad(logp, z)
    return grad                                                         # (1, C, h, w)


def guided_eps(eps: torch.Tensor, sigma: torch.Tensor, scale: float, grad: torch.Tensor) -> torch.Tensor:
    """Classifier guidance as a shift of the noise estimate (Dhariwal & Nichol 2021, Algorithm 2 /
    eq. 14 for eps-prediction):  eps_hat = eps - s * sqrt(1 - abar_t) * grad_{z_t} log p(y | z_t, t).
    For the variance-exploding samplers (Euler: x = z_t / alpha, sigma_ve = sigma / alpha) the
    score of x is -eps / sigma_ve and the classifier term is alpha * grad_{z_t} log p (chain rule),
    so eps_hat = eps - s * sigma_ve * alpha * grad = the same expression with sigma = sqrt(1 - abar):
    one formula serves every sampler. eps, grad: (1, C, h, w); sigma: VP sigma, (1, 1, 1, 1)."""
    return eps - scale * sigma * grad
