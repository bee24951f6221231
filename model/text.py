"""Text conditioning: transformers' CLIPTokenizer + CLIPTextModel, as Stable Diffusion uses them.

Prompts are padded/truncated to the tokenizer's model_max_length (77 for SD); a prompt that is
cut gets a warning string returned to the caller. The unconditional input of classifier-free
guidance (Ho & Salimans 2022) is the encoding of the negative prompt, "" when there is none.
The conditioning is the text model's last hidden state, (B, 77, D), as in SD 1.x/2.x; SDXL's two
encoders are model/text_sdxl.py. Both give `embed(texts) -> (context, pooled or None, truncated)`.
Loading (vocab.json + merges.txt or tokenizer.json; safetensors weights) is model/loader.py's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Conditioning:
    """One request's text conditioning: cond/uncond (1, L, D) context, for families with a pooled
    text embedding (SDXL) pooled/uncond_pooled (1, P), and the warnings it produced."""

    cond: torch.Tensor
    uncond: torch.Tensor
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0          # this request's share of the batched text-encoder call
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, list[bool]]:
    """(B, max_length) token ids (BOS ... EOS, padded) and, per text, whether it was truncated."""
    full = tokenizer(texts, truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
    ids = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt")["input_ids"]
    return ids, [len(f) > max_length for f in full]


class TextEncoder:
    """SD 1.x/2.x conditioning: tokenize + encode a batch of strings in ONE text-model call."""

    def __init__(self, tokenizer, model):
        self.tokenizer = tokenizer
        self.model = model
        self.max_length = int(tokenizer.model_max_length)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """(B, 77) token ids (BOS ... EOS, padded) and, per text, whether it was truncated."""
        return tokenize(self.tokenizer, texts, self.max_length)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """texts -> (B, 77, D) last hidden states and, per text, whether it was truncated."""
        ids, cut = self.tokenize(texts)
        device = next(self.model.parameters()).device
        hidden = self.model(ids.to(device))[0]                       # (B, 77, D)
        return hidden, cut

    def embed(self, texts: list[str]) -> tuple[torch.Tensor, None, list[bool]]:
        """The conditioner's interface: (context (B, 77, D), no pooled embedding, truncated)."""
        hidden, cut = self.encode(texts)
        return hidden, None, cut
