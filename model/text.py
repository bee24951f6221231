"""Text conditioning: transformers' CLIPTokenizer + CLIPTextModel, as Stable Diffusion uses them.

Prompts are padded/truncated to the tokenizer's model_max_length (77 for SD); a prompt that is
cut gets a warning string returned to the caller. The unconditional input of classifier-free
guidance (Ho & Salimans 2022) is the encoding of the negative prompt, "" when there is none.
The conditioning is the text model's last hidden state, (B, 77, D), as in SD 1.x/2.x.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from model.errors import ModelLoadError


@dataclass
class Conditioning:
    """One request's text conditioning: cond/uncond (1, L, D) and the warnings it produced."""

    cond: torch.Tensor
    uncond: torch.Tensor
    warnings: list[str] = field(default_factory=list)


def load_tokenizer(folder: str | os.PathLike):
    """CLIPTokenizer from a folder holding vocab.json + merges.txt (as SD repositories ship it) or
    only tokenizer.json (as transformers v5 writes it)."""
    from transformers import CLIPTokenizer

    folder = os.fspath(folder)
    has_bpe = all(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "merges.txt"))
    has_json = os.path.isfile(os.path.join(folder, "tokenizer.json"))
    if not (has_bpe or has_json):
        raise ModelLoadError(f"{folder}: no tokenizer (need vocab.json + merges.txt, or tokenizer.json)")
    try:
        tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # corrupt JSON, unreadable merges, ...
        raise ModelLoadError(f"{folder}: cannot load the CLIP tokenizer: {e}") from e
    if not tok.model_max_length or tok.model_max_length > 10_000:
        tok.model_max_length = 77   # configs without model_max_length: CLIP's context length
    return tok


def load_text_encoder(folder: str | os.PathLike, device="cpu", dtype=torch.float32):
    """CLIPTextModel from a folder with config.json + *.safetensors (pickled weights are refused)."""
    from transformers import CLIPTextModel

    folder = os.fspath(folder)
    files = os.listdir(folder) if os.path.isdir(folder) else []
    if "config.json" not in files:
        raise ModelLoadError(f"{folder}: missing config.json of the text encoder")
    if not any(f.endswith(".safetensors") for f in files):
        pickled = [f for f in files if f.endswith((".bin", ".ckpt", ".pt"))]
        hint = (f" (found {', '.join(pickled)}: pickled weights are refused; convert them to "
                "safetensors, e.g. with safetensors.torch.save_file on a trusted machine)") if pickled else ""
        raise ModelLoadError(f"{folder}: no *.safetensors weights for the text encoder{hint}")
    try:
        model = CLIPTextModel.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                              dtype=dtype)
    except Exception as e:
        raise ModelLoadError(f"{folder}: cannot load the CLIP text encoder: {e}") from e
    return model.to(device).eval().requires_grad_(False)


class TextEncoder:
    """Tokenize + encode a batch of strings in ONE text-model call."""

    def __init__(self, tokenizer, model):
        self.tokenizer = tokenizer
        self.model = model
        self.max_length = int(tokenizer.model_max_length)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """(B, 77) token ids (BOS ... EOS, padded) and, per text, whether it was truncated."""
        full = self.tokenizer(texts, truncation=False, add_special_tokens=True)["input_ids"]
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
