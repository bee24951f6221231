"""Text conditioning: transformers' CLIPTokenizer + CLIPTextModel, as Stable Diffusion uses them.

Prompts are padded/truncated to the tokenizer's model_max_length (77 for SD); a prompt that is
cut gets a warning string returned to the caller. The unconditional input of classifier-free
guidance (Ho & Salimans 2022) is the encoding of the negative prompt, "" when there is none.
The conditioning is the text model's last hidden state, (B, 77, D), as in SD 1.x/2.x.
Loading (vocab.json + merges.txt or tokenizer.json; safetensors weights) is model/loader.py's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Conditioning:
    """One request's text conditioning: cond/uncond (1, L, D) and the warnings it produced."""

    cond: torch.Tensor
    uncond: torch.Tensor
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0          # this request's share of the batched text-encoder call


class TextEncoder:
    """Tokenize + encode a batch of strings in ONE text-model call."""

    def __init__(self, tokenizer, model):
        self.tokenizer = tokenizer
        self.model = model
        self.max_length = int(tokenizer.model_max_length)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """(B, 77) token ids (BOS ... EOS, padded) and, per text, whether it was truncated."""
        full = self.tokenizer(texts, truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
        ids = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")["input_ids"]
        return ids, [len(f) > self.max_length for f in full]

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """texts -> (B, 77, D) last hidden states and, per text, whether it was truncated."""
        ids, cut = self.tokenize(texts)
        device = next(self.model.parameters()).device
        hidden = self.model(ids.to(device))[0]                       # (B, 77, D)
        return hidden, cut
