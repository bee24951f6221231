"""JobSpec: the versioned job payload that crosses the queue, as JSON only (never pickled).

Torch-free. Its request fields are derived from the declaration (jobs/request.py, surface
"spec"): the API builds a spec from a request resolved once (jobs/request_resolve.py), so every
value is there; the worker parses it back with `JobSpec.from_json` and `check`s it against the
model it holds (model/request.py `check`: validation only, no defaults). The field bounds are
the declaration's static ones (so a spec read off the queue can be trusted to be well-typed).
Image k of a job uses seed `seed + k`.

Edits (kind img2img / inpaint) carry no pixels: the init image and mask are stored next to the
job record (jobs/keys.py `init_image`, deleted when the job ends), already resized to
width x height by the API.
"""
from __future__ import annotations

import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from latentd.jobs.request_models import spec_fields
from latentd.model.request import MAX_SEED, check, default_eta, start_step

SPEC_VERSION = 1


class _Envelope(BaseModel):
    """What a job is besides its request: format version, owner (the API key's name/id, never the
    key), and the worker's time limit."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    version: Literal[1] = SPEC_VERSION
    owner: str = Field(min_length=1, max_length=200)
    timeout_s: float | None = Field(default=None, gt=0, le=86400)     # None: worker default


class JobSpec(create_model("JobSpecFields", __base__=_Envelope, **spec_fields())):
    """One job: n images of one resolved request."""

    @model_validator(mode="after")
    def _consistent(self):
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

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, data: str | bytes) -> "JobSpec":
        return cls.model_validate_json(data)

    def image_request_kwargs(self, k: int) -> dict:
        """Keyword arguments of model.pipeline.GenerationRequest for image k (seed + k)."""
        return image_request_kwargs(self, k)

    def params(self) -> dict:
        """Generation parameters as shown to the owner (job `params`, image metadata)."""
        return self.model_dump(exclude={"owner", "version", "timeout_s"})

    def check(self, info) -> "JobSpec":
        """Validate this spec against the model `info` (model.info.ModelInfo) it is to run on:
        raises model.errors.InvalidRequest naming the field. Returns the spec to run; the API's
        are complete, and only a spec built by hand without a size gets the model's native size
        (one without an eta runs with its sampler's: GenerationRequest's None)."""
        spec = self
        if self.width is None or self.height is None:
            spec = self.model_copy(update={"width": self.width or info.native_width,
                                           "height": self.height or info.native_height})
        check(info, spec.model_copy(update={"seed": spec.seed or 0, "eta": default_eta(spec.sampler, spec.eta)}))
        return spec


def image_request_kwargs(r, k: int) -> dict:
    """GenerationRequest's keyword arguments (all but loras and an edit's pixels) for image k of
    a job or of a request resolved by `latentd generate` (jobs/request_resolve.py Resolved: the
    same fields), so that both draw the same image."""
    return dict(prompt=r.prompt, negative_prompt=r.negative_prompt, width=r.width, height=r.height,
                steps=r.steps, guidance_scale=r.guidance_scale, sampler=r.sampler, karras=r.karras,
                eta=r.eta, timestep_spacing=r.timestep_spacing, cache_interval=r.cache_interval,
                seed=(r.seed or 0) + k, strength=r.strength, classifier_targets=r.classifier_targets,
                classifier_scale=r.classifier_scale)
