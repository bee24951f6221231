"""DeepCache (Ma et al. 2024, "DeepCache: Accelerating Diffusion Models for Free"), per row.

Adjacent denoising steps change the U-Net's deep features little, so a row may reuse the input
to the U-Net's last up block (the output of every deeper block, "the deep features") from its
last full step and run only the shallow path: conv_in, the first down block's ResNets (and
transformers), the last up block on [cached deep features, fresh shallow skips], conv_out.
A request with cache_interval N runs a full step at steps 0, N, 2N, ... and in the last fifth of
its steps (full_step), the shallow path otherwise (N = 1: always full, the plain U-Net).

Rows at full and at cached steps share one call: the shallow path runs for every row, the deep
path for the full-step rows only (gathered, in the input's memory layout, a lone row doubled as
the pipeline does, with its LoRA mix restricted to them). Each row's numbers are those of its
request run alone: the same modules on the same row, only in company.

The deep features are (rows, C1, h, w) at the latent resolution, C1 = the second level's width
(SD 1.5 at 512 px: 640 x 64 x 64 floats per row, 10 MB; the bundled model: 64 x 16 x 16); they live in the RequestState and move
with a saved row (model/row_state.py), so a parked or resumed request goes on exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from latentd.model import lora_runtime
from latentd.model.layout import memory_format_of as _layout


def full_step(step: int, steps: int, n: int) -> bool:
    """Whether a request with cache_interval n runs the whole U-Net at this step of its plan:
    every n-th step, and every one of the last fifth. DeepCache's non-uniform schedule (Ma et
    al. 2024, §3.3) spends full steps where the deep features change most; on the bundled model
    at 20 DPM++ 2M steps and n = 3 (54 captions x 2 seeds, all three right, 98.1 % at n = 1):
    uniform 86.1 % (7 full steps), the first 4 also full 83.3 % (9), the last 4 also full
    95.4 % (10): the final steps, which draw the edges and corners, need fresh deep features."""
    return step % n == 0 or step >= steps - max(1, steps // 5)


def _take(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Rows of x in x's own memory layout (None: all of them, untouched)."""
    return x if index is None else x.index_select(0, index).contiguous(memory_format=_layout(x))


def forward(unet, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, added, deep: list[int],
            cached: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The U-Net with the deep path on rows `deep` only.
    x (B, C, h, w), t (B,), context (B, L, D); cached (B - len(deep), C1, h, w): the deep features
    of the other rows, in row order. -> (eps (B, C_out, h, w), deep features of rows `deep`)."""
    b = x.shape[0]
    emb = unet.embed(x, t, added)                                    # (B, 4*C0)
    context = context.to(x.dtype)
    h = unet.conv_in(x)                                              # (B, C0, h, w)
    skips = [h]
    first = unet.down_blocks[0]
    for i, resnet in enumerate(first.resnets):                       # the shallow down path
        h = resnet(h, emb)
        if first.attentions is not None:
            h = first.attentions[i](h, context)
        skips.append(h)
    feats = None
    if deep:
        index = None if len(deep) == b else torch.tensor(deep, dtype=torch.long, device=x.device)
        lone = len(deep) == 1                  # a batch of one takes another conv path: doubled
        rows = [0, 0] if lone else list(range(len(deep)))

        def sub(v):
            v = _take(v, index)
            return torch.cat([v, v]).contiguous(memory_format=_layout(v)) if lone else v

        mix = lora_runtime.current()
        hd, embd, ctxd = sub(h), sub(emb), sub(context)
        stack = [sub(s) for s in skips]
        with lora_runtime.active(None if mix is None else mix.subset([deep[j] for j in rows])):
            if first.downsamplers is not None:
                hd = first.downsamplers[0](hd)
                stack.append(hd)
            for block in [*unet.down_blocks[1:], unet.mid_block, *unet.up_blocks[:-1]]:
                hd = block(hd, embd, ctxd, stack)
        feats = hd[:1] if lone else hd                               # (len(deep), C1, h, w)
    if feats is not None and len(deep) == b:
        full = feats
    else:
        parts, it_c, it_d = [], 0, 0
        for i in range(b):
            if it_d < len(deep) and deep[it_d] == i:
                parts.append(feats[it_d:it_d + 1])
                it_d += 1
            else:
                parts.append(cached[it_c:it_c + 1].to(x.dtype))
                it_c += 1
        full = torch.cat(parts).contiguous(memory_format=_layout(h))
    out = unet.up_blocks[-1](full, emb, context, skips)
    eps = unet.conv_out(F.silu(unet.conv_norm_out(out))).contiguous()
    return eps, (feats if feats is not None else full[:0])
