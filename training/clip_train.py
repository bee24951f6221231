"""Small CLIP for the shapes data (Radford et al. 2021): transformers' CLIPModel with a text tower
of max_position_embeddings 77 (the 77-token contract holds) and a 64x64 ViT vision tower, trained
contrastively on (image, caption) pairs. Its text tower becomes the frozen text encoder of the
diffusion model; its vision tower powers the safety checker and the CLIP score.

Only 54 distinct captions exist, so a batch has many pairs sharing a caption. The loss treats
every pair with the same caption as a positive:
  image -> text: cross-entropy over all 54 caption embeddings (exactly one correct caption);
  text -> image: for each caption present in the batch, cross-entropy against a uniform
                 target over the images that carry it (multi-positive InfoNCE).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from latentd.training import data
from latentd.training.bpe import tokenize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # CLIP's pixel normalisation (feature_extractor)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def make_config(vocab: dict, hidden: int = 64, layers: int = 2, heads: int = 4, proj: int = 64):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
    text = CLIPTextConfig(vocab_size=vocab["vocab_size"], hidden_size=hidden, intermediate_size=4 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                          hidden_act="quick_gelu", projection_dim=proj, bos_token_id=vocab["bos_token_id"],
                          eos_token_id=vocab["eos_token_id"], pad_token_id=vocab["pad_token_id"])
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=64, patch_size=8, num_channels=3,
                              hidden_act="quick_gelu", projection_dim=proj)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=proj)


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 64, 64) in [-1, 1] -> CLIP-normalised pixels, as CLIPImageProcessor would give."""
    x = (images + 1) / 2
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def image_embeds(model, pixels) -> torch.Tensor:
    """(B, 3, 64, 64) CLIP pixels -> (B, P) projected image embeddings (pooled CLS token)."""
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


def text_embeds(model, ids) -> torch.Tensor:
    """(N, 77) ids -> (N, P) projected text embeddings (pooled at <|endoftext|>)."""
    return model.text_projection(model.text_model(input_ids=ids).pooler_output)


def clip_loss(model, pixels, caption_idx, all_ids) -> torch.Tensor:
    img = F.normalize(image_embeds(model, pixels), dim=-1)                        # (B, P)
    txt = F.normalize(text_embeds(model, all_ids), dim=-1)                        # (54, P)
    scale = model.logit_scale.exp().clamp(max=100)
    logits = scale * img @ txt.T                                                  # (B, 54)
    l_i2t = F.cross_entropy(logits, caption_idx)
    present = torch.unique(caption_idx)                                           # (K,)
    l_t2i = logits[:, present].T                                                  # (K, B)
    target = (caption_idx.view(1, -1) == present.view(-1, 1)).float()
    target = target / target.sum(1, keepdim=True)
    l_t2i = -(target * F.log_softmax(l_t2i, dim=1)).sum(1).mean()
    acc = (logits.argmax(1) == caption_idx).float().mean()
    return (l_i2t + l_t2i) / 2, acc


def train_clip(tok, vocab: dict, steps: int, batch: int, seed: int, log=print, lr: float = 1e-3):
    from transformers import CLIPModel
    torch.manual_seed(seed)
    model = CLIPModel(make_config(vocab))
    all_ids = tokenize(tok, list(data.CAPTIONS))                                  # (54, 77)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.time()
    bar = tqdm(range(steps), desc="clip", mininterval=5)
    for step in bar:
        b = data.sample(batch, gen)
        loss, acc = clip_loss(model, clip_pixels(b.images), b.caption, all_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc.item():.2f}")
            log(f"clip step {step} loss {loss.item():.4f} acc {acc.item():.3f} t {time.time() - t0:.0f}s")
    model.eval()
    return model


@torch.no_grad()
def evaluate_clip(model, tok, n: int = 1024, seed: int = 12345) -> dict:
    """Zero-shot accuracy of image -> caption over the 54 captions on fresh data."""
    gen = torch.Generator().manual_seed(seed)
    b = data.sample(n, gen)
    _, acc = clip_loss(model, clip_pixels(b.images), b.caption, tokenize(tok, list(data.CAPTIONS)))
    return {"zero_shot_acc": float(acc)}
