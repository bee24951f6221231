"""A model family's conditioning parts, chosen by its configs (a family adds parts; the pipeline
is one):

    family  text conditioning (`text`)                       added conditioning (`added`)
    sd      one CLIP text encoder, last hidden state          none
    sdxl    CLIP ViT-L + OpenCLIP bigG, penultimate states    pooled text + size/crop ids
            concatenated; bigG's projected pooled output      (model/added_cond.py TextTime; with
                                                              requires_aesthetics_score in
                                                              model_index.json: an aesthetic score
                                                              in place of the target size)

plus two family rules: `zero_empty_negative` (SDXL's force_zeros_for_empty_prompt: without a
negative prompt the unconditional context and pooled embedding are zeros, not the encoding of "")
and `skip_uncond_at_one` (guidance <= 1 runs no unconditional row for that request, as diffusers'
SDXL pipeline; SD keeps latentd's earlier rule, w (out_c - out_u) + out_u for every w). The U-Net
and VAE come from their own configs (model/config.py), which is where the family is read from
(model/family.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from latentd.model.added_cond import TextTime
from latentd.model.errors import ModelLoadError
from latentd.model.text import TextEncoder
from latentd.model.text_sdxl import DualTextEncoder


@dataclass(frozen=True)
class Conditioner:
    family: str                                  # "sd" | "sdxl" (model/family.py)
    text: TextEncoder | DualTextEncoder          # embed(texts) -> (context, pooled | None, truncated)
    added: TextTime | None = None                # per-row added U-Net conditioning; None: none
    zero_empty_negative: bool = False
    skip_uncond_at_one: bool = False


def conditioner_for(c) -> Conditioner:
    """The parts of loaded Components (model/loader.py), by c.info.family."""
    def frozen(m):
        return m.eval().requires_grad_(False)

    if c.info.family == "sd":
        return Conditioner("sd", TextEncoder(c.tokenizer, frozen(c.text_encoder)))
    if c.info.family == "sdxl":
        text = DualTextEncoder(c.tokenizer, frozen(c.text_encoder), c.tokenizer_2, frozen(c.text_encoder_2))
        aesthetics = bool(c.model_index.get("requires_aesthetics_score", False))
        return Conditioner("sdxl", text, TextTime(aesthetics),
                           zero_empty_negative=bool(c.model_index.get("force_zeros_for_empty_prompt", True)),
                           skip_uncond_at_one=True)
    raise ModelLoadError(f"{c.name}: unknown model family {c.info.family!r}")
