"""SDXL's text conditioning (Podell et al. 2023, §2.1): two text encoders, CLIP ViT-L and
OpenCLIP ViT-bigG, each with its own tokenizer.

    context = [h1 ; h2]          (B, 77, D1 + D2)   penultimate hidden states, concatenated on
                                                    channels (768 + 1280 = 2048 for SDXL)
    pooled  = W_proj h2[EOS]     (B, P)             the second encoder's projected pooled output
                                                    (1280), the U-Net's added conditioning

as diffusers' StableDiffusionXLPipeline.encode_prompt (clip_skip=None): "penultimate" is
hidden_states[-2], the output of the next-to-last layer without the final layer norm. Prompts are
padded/truncated to 77 tokens by each tokenizer (the second pads with its own pad token).
"""
from __future__ import annotations

import torch

from latentd.model.text import tokenize


class DualTextEncoder:
    """Tokenize + encode a batch of strings with both encoders (one call each)."""

    def __init__(self, tokenizer, model, tokenizer_2, model_2):
        self.tokenizer, self.model = tokenizer, model                # transformers CLIPTextModel
        self.tokenizer_2, self.model_2 = tokenizer_2, model_2        # CLIPTextModelWithProjection
        self.max_length = int(tokenizer.model_max_length)
        self.max_length_2 = int(tokenizer_2.model_max_length)

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """texts -> (context (B, 77, D1 + D2), pooled (B, P), per text whether it was truncated)."""
        ids, cut = tokenize(self.tokenizer, texts, self.max_length)              # (B, 77)
        ids_2, cut_2 = tokenize(self.tokenizer_2, texts, self.max_length_2)      # (B, 77)
        out = self.model(ids.to(_device(self.model)), output_hidden_states=True)
        out_2 = self.model_2(ids_2.to(_device(self.model_2)), output_hidden_states=True)
        h1, h2 = out.hidden_states[-2], out_2.hidden_states[-2]                 # (B, 77, D1), (B, 77, D2)
        context = torch.cat([h1, h2.to(h1.dtype)], dim=-1)                    # (B, 77, D1 + D2)
        return context, out_2.text_embeds, [a or b for a, b in zip(cut, cut_2)]   # pooled: (B, P)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """(context (B, 77, D1 + D2), truncated): TextEncoder.encode's shape of answer."""
        context, _, cut = self.embed(texts)
        return context, cut


def _device(model) -> torch.device:
    return next(model.parameters()).device
