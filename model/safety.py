"""Stable Diffusion's safety checker, reimplemented on transformers' CLIPVisionModel.

An image's CLIP embedding e = P(pool(ViT(image))) is compared by cosine similarity with 17
"concept" and 3 "special care" embeddings shipped in the model's safety_checker/ weights, each
with its own threshold (concept_embeds_weights, special_care_embeds_weights):
    special_score_j = round(cos(e, s_j) - w_s_j, 3);   adjustment = 0.01 if any special_score_j > 0
    concept_score_k = round(cos(e, c_k) - w_c_k + adjustment, 3);  flagged = any concept_score_k > 0
(the decision rule of the original CompVis/diffusers checker, scores rounded to 3 decimals as
there). A flagged image is replaced by a black image. Preprocessing follows
feature_extractor/preprocessor_config.json without torchvision: resize the shortest side with PIL
(bicubic by default), center crop, scale to [0, 1], normalize with the CLIP mean/std.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from latentd.model.errors import ModelLoadError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class SafetyChecker(nn.Module):
    """CLIP vision tower + visual projection + the concept embeddings and their thresholds."""

    def __init__(self, clip_config, preprocess: dict | None = None):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        if isinstance(clip_config, dict):
            vcfg = CLIPVisionConfig(**dict(clip_config.get("vision_config") or {}))
            proj = int(clip_config.get("projection_dim", 768))
        else:                                                   # transformers CLIPConfig
            vcfg, proj = clip_config.vision_config, int(clip_config.projection_dim)
        self.vision_model = CLIPVisionModel(vcfg)
        hidden = self.vision_model.config.hidden_size
        self.visual_projection = nn.Linear(hidden, proj, bias=False)
        self.register_buffer("concept_embeds", torch.ones(17, proj))
        self.register_buffer("concept_embeds_weights", torch.ones(17))
        self.register_buffer("special_care_embeds", torch.ones(3, proj))
        self.register_buffer("special_care_embeds_weights", torch.ones(3))
        self.preprocess_config = dict(preprocess or {})

    # -- weights -------------------------------------------------------------------------------
    def load_weights(self, state: dict[str, torch.Tensor], source: str = "safety_checker") -> None:
        """Strictly load diffusers' StableDiffusionSafetyChecker keys. The vision tower's keys are
        'vision_model.vision_model.*' (transformers v4 files) or 'vision_model.*' (v5 files)."""
        renamed = {}
        for k, v in state.items():
            if k.startswith("vision_model."):
                k = "vision_model." + k[len("vision_model."):].removeprefix("vision_model.")
            renamed[k] = v
        own = self.state_dict()
        missing = sorted(set(own) - set(renamed))
        unexpected = sorted(set(renamed) - set(own) - {"vision_model.embeddings.position_ids"})
        if missing or unexpected:
            raise ModelLoadError(f"{source}: safety checker keys do not match: missing {missing[:5]}"
                                 f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
        for k, v in own.items():
            if renamed[k].shape != v.shape:
                raise ModelLoadError(f"{source}: {k} has shape {tuple(renamed[k].shape)}, "
                                     f"expected {tuple(v.shape)}")
        self.load_state_dict({k: renamed[k] for k in own}, strict=True)

    # -- preprocessing -------------------------------------------------------------------------
    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL RGB images -> (B, 3, S, S) normalized CLIP input, per preprocessor_config.json."""
        cfg = self.preprocess_config
        size = cfg.get("size", {"shortest_edge": 224})
        short = size["shortest_edge"] if isinstance(size, dict) else int(size)
        crop = cfg.get("crop_size", {"height": short, "width": short})
        ch, cw = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
        resample = int(cfg.get("resample", 3))                       # 3 = PIL bicubic
        mean = np.asarray(cfg.get("image_mean", CLIP_MEAN), dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(cfg.get("image_std", CLIP_STD), dtype=np.float32).reshape(3, 1, 1)
        scale = float(cfg.get("rescale_factor", 1 / 255))
        out = []
        for im in images:
            im = im.convert("RGB")
            if cfg.get("do_resize", True):
                w, h = im.size
                if w <= h:
                    nw, nh = short, int(short * h / w)
                else:
                    nw, nh = int(short * w / h), short
                im = im.resize((nw, nh), resample=resample)
            a = np.asarray(im).transpose(2, 0, 1)                     # (3, H, W) uint8
            if cfg.get("do_center_crop", True):
                top, left = (a.shape[1] - ch) // 2, (a.shape[2] - cw) // 2
                if top < 0 or left < 0:
                    raise ValueError(f"image {a.shape[2]}x{a.shape[1]} smaller than crop {cw}x{ch}")
                a = a[:, top:top + ch, left:left + cw]
            a = a.astype(np.float32)
            if cfg.get("do_rescale", True):
                a = a * np.float32(scale)
            if cfg.get("do_normalize", True):
                a = (a - mean) / std
            out.append(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)))
        return torch.stack(out)

    # -- decision ------------------------------------------------------------------------------
    @torch.inference_mode()
    def scores(self, pixel_values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, S, S) -> (special (B, 3), concept (B, 17)) cosine similarities, float32 numpy."""
        p = next(self.parameters())
        pooled = self.vision_model(pixel_values.to(p.device, p.dtype)).pooler_output   # (B, hidden)
        e = nn.functional.normalize(self.visual_projection(pooled).float(), dim=-1)     # (B, P)
        special = e @ nn.functional.normalize(self.special_care_embeds.float(), dim=-1).T
        concept = e @ nn.functional.normalize(self.concept_embeds.float(), dim=-1).T
        return special.cpu().numpy(), concept.cpu().numpy()

    def flags(self, images: list[Image.Image]) -> list[bool]:
        """Whether each image shows a concept above its threshold (see the module docstring)."""
        if not images:
            return []
        special, concept = self.scores(self.pixel_values(images))
        ws = self.special_care_embeds_weights.float().cpu().numpy()
        wc = self.concept_embeds_weights.float().cpu().numpy()
        special_hit = (np.round(special - ws, 3) > 0).any(axis=1)                   # (B,)
        adjustment = np.where(special_hit, np.float32(0.01), np.float32(0.0))[:, None]
        concept_scores = np.round((concept - wc) + adjustment, 3)                   # (B, 17)
        return [bool(x) for x in (concept_scores > 0).any(axis=1)]

    def check(self, images: list[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
        """Flag images; flagged ones are replaced by black images of the same size."""
        flagged = self.flags(images)
        out = [Image.new("RGB", im.size) if f else im for im, f in zip(images, flagged)]
        return out, flagged


def build_safety_checker(clip_config, state: dict[str, torch.Tensor], preprocess: dict | None,
                         source: str = "safety_checker", device="cpu", dtype=torch.float32) -> SafetyChecker:
    """SafetyChecker from the checker's CLIP config (dict or transformers CLIPConfig), its state
    dict (diffusers' StableDiffusionSafetyChecker keys) and feature_extractor's preprocessor config
    (model.loader.load_safety reads the first two from safety_checker/)."""
    checker = SafetyChecker(clip_config, preprocess)
    checker.load_weights(state, source)
    return checker.to(device=device, dtype=dtype).eval().requires_grad_(False)
