"""What the worker makes of a finished image before it is encoded and stored: the moderation
decision and the image's usage share.

Moderation: the worker's pipeline judges without redacting (`judged` wraps the model's safety
checker at load), and `moderated` decides per job: a flagged image is replaced by black unless
its job asked for moderation "low" (which the API admits only for keys permitted it, app/auth.py). A pipeline that was not wrapped has already blacked its flagged images, so a
mistake here can only redact, never reveal. Previews never pass through here: they are coarse
mosaics of the x0 estimate (model/preview.py), the same for every moderation level.
"""
from __future__ import annotations

from PIL import Image

from latentd.jobs.usage import image_share


class JudgeOnly:
    """A safety checker that flags and leaves the images as they are (the worker redacts)."""

    def __init__(self, checker):
        self.checker = checker

    def check(self, images):
        return list(images), self.checker.flags(images)


def judged(pipe) -> None:
    """Make `pipe` (model.pipeline.Pipeline) judge without redacting; idempotent."""
    if getattr(pipe, "safety", None) is not None and not isinstance(pipe.safety, JudgeOnly):
        pipe.safety = JudgeOnly(pipe.safety)


def moderated(image: Image.Image, nsfw: bool, spec) -> Image.Image:
    """The image to store: black when flagged, unless the job's moderation is "low"."""
    if nsfw and spec.moderation != "low":
        return Image.new("RGB", image.size)
    return image


def text_tokens(pipe, spec) -> int:
    """The prompt's and the negative prompt's tokens as the model's (first) CLIP tokenizer reads
    them: each with its start and end token, truncated at the encoder's length."""
    text = pipe.conditioner.text
    return sum(len(text.tokenizer(t, truncation=True, max_length=text.max_length).input_ids)
               for t in (spec.prompt, spec.negative_prompt))


def usage_share(pipe, spec, image: Image.Image) -> dict:
    return image_share(spec, image.width, image.height, pipe.info.vae_factor, text_tokens(pipe, spec))
