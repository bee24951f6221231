"""JobSpec: the versioned job payload that crosses the queue, as JSON only (never pickled).

Torch-free: the API builds it from a request resolved by `model.request.resolve`; the worker
parses it back with `JobSpec.from_json` and `check`s it against its model with the same resolver.
The field ranges here are model-independent sanity bounds (so a spec read off the queue can be
trusted to be well-typed). Image k of a job uses seed `seed + k`.

Edits (kind img2img / inpaint) carry no pixels: the init image and mask are stored next to the
job record (jobs/keys.py `init_image`, deleted when the job ends), already resized to
width x height by the API.
"""
from __future__ import annotations

import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from latentd.model.classifier_spec import MAX_SCALE as MAX_CLASSIFIER_SCALE
from latentd.model.request import (DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, KINDS, MAX_N, MAX_PROMPT_CHARS,
                           MAX_SEED, OUTPUT_FORMATS, Limits, resolve, start_step)

SPEC_VERSION = 1


class JobSpec(BaseModel):
    """One job: n images of one prompt. `owner` is the API key's name/id, never the key."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    version: Literal[1] = SPEC_VERSION
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    width: StrictInt | None = Field(default=None, ge=8, le=8192)
    height: StrictInt | None = Field(default=None, ge=8, le=8192)
    steps: StrictInt = Field(default=DEFAULT_STEPS, ge=1, le=1000)
    guidance_scale: float = Field(default=DEFAULT_GUIDANCE, ge=0.0, le=100.0)
    sampler: str = Field(default=DEFAULT_SAMPLER, min_length=1, max_length=32)
    karras: StrictBool = False
    eta: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: StrictInt | None = Field(default=None, ge=0, lt=MAX_SEED)   # None: chosen at submit
    model: str | None = Field(default=None, max_length=512)
    owner: str = Field(min_length=1, max_length=200)
    timeout_s: float | None = Field(default=None, gt=0, le=86400)     # None: worker default
    kind: Literal[KINDS] = "text"
    strength: float | None = Field(default=None, gt=0.0, le=1.0)      # edits only
    output_format: Literal[OUTPUT_FORMATS] = "png"
    output_compression: StrictInt | None = Field(default=None, ge=0, le=100)
    # classifier guidance (model/classifier_spec.py): ((head, label), ...) and its scale
    classifier_targets: tuple[tuple[str, str], ...] = Field(default=(), max_length=8)
    classifier_scale: float = Field(default=0.0, ge=0.0, le=MAX_CLASSIFIER_SCALE)

    @model_validator(mode="after")
    def _seeds_fit(self):
        if self.seed is not None and self.seed + self.n - 1 >= MAX_SEED:
            raise ValueError(f"seed + n - 1 must be < 2**63 (image k uses seed + k), got seed={self.seed}")
        if (self.kind == "text") != (self.strength is None):
            raise ValueError("strength is set for edits (kind img2img / inpaint) and only for them")
        if self.kind != "text" and (self.width is None or self.height is None):
            raise ValueError("an edit has its width and height resolved")
        return self

    @property
    def run_steps(self) -> int:
        """Denoising steps each image runs (an edit runs the last int(steps * strength))."""
        return self.steps - start_step(self.steps, self.strength)

    def with_seed(self) -> "JobSpec":
        """This spec with a concrete seed (a random one when absent), so every image's seed is
        known before it runs and a re-run after a crash draws the same images."""
        if self.seed is not None:
            return self
        return self.model_copy(update={"seed": secrets.randbelow(MAX_SEED - self.n)})

    def seeds(self) -> list[int]:
        base = self.seed or 0
        return [base + k for k in range(self.n)]

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, data: str | bytes) -> "JobSpec":
        return cls.model_validate_json(data)

    def image_request_kwargs(self, k: int) -> dict:
        """Keyword arguments of model.pipeline.GenerationRequest for image k (seed + k)."""
        return dict(prompt=self.prompt, negative_prompt=self.negative_prompt, width=self.width,
                    height=self.height, steps=self.steps, guidance_scale=self.guidance_scale,
                    sampler=self.sampler, karras=self.karras, eta=self.eta,
                    seed=(self.seed or 0) + k, strength=self.strength,
                    classifier_targets=self.classifier_targets, classifier_scale=self.classifier_scale)

    def params(self) -> dict:
        """Generation parameters as shown to the owner (job `params`, image metadata)."""
        return self.model_dump(exclude={"owner", "version", "timeout_s"})

    def check(self, info) -> None:
        """Model-dependent validation (model.info.ModelInfo) by model.request.resolve, the same
        resolver the API and the engine run: raises model.errors.InvalidRequest naming the field."""
        size = None if self.kind == "text" else (self.width, self.height)
        resolve(info, prompt=self.prompt, negative_prompt=self.negative_prompt, n=self.n,
                width=self.width, height=self.height, steps=self.steps,
                guidance_scale=self.guidance_scale, sampler=self.sampler, karras=self.karras,
                eta=self.eta, seed=self.seed, image_size=size,
                mask_size=size if self.kind == "inpaint" else None, strength=self.strength,
                output_format=self.output_format, output_compression=self.output_compression,
                classifier_guidance=({**dict(self.classifier_targets), "scale": self.classifier_scale}
                                     if self.classifier_targets else None),
                limits=Limits(max_n=MAX_N, max_prompt_chars=MAX_PROMPT_CHARS))
