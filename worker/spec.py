"""JobSpec: the versioned job payload that crosses the queue, as JSON only (never pickled).

Torch-free: the API builds and validates it; the worker parses it back with `JobSpec.from_json`.
The field ranges here are model-independent sanity bounds (so a spec read off the queue can be
trusted to be well-typed); the model-dependent rules (allowed sizes, max steps, samplers) are
`model.info.check_request`, run by the API against the model's info before submitting and by the
engine again before running. Image k of a job uses seed `seed + k`.
"""
from __future__ import annotations

import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

SPEC_VERSION = 1
MAX_SEED = 2**63          # same bound as model.info.MAX_SEED (torch.Generator takes an int64)
MAX_N = 16                # images per job
MAX_PROMPT_CHARS = 4000   # the text encoder truncates at 77 tokens anyway; this bounds payloads


class JobSpec(BaseModel):
    """One job: n images of one prompt. `owner` is the API key's name/id, never the key."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    version: Literal[1] = SPEC_VERSION
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    width: StrictInt | None = Field(default=None, ge=8, le=8192)
    height: StrictInt | None = Field(default=None, ge=8, le=8192)
    steps: StrictInt = Field(default=20, ge=1, le=1000)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=100.0)
    sampler: str = Field(default="dpmpp_2m", min_length=1, max_length=32)
    karras: StrictBool = False
    eta: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: StrictInt | None = Field(default=None, ge=0, lt=MAX_SEED)   # None: chosen at submit
    model: str | None = Field(default=None, max_length=512)
    owner: str = Field(min_length=1, max_length=200)
    timeout_s: float | None = Field(default=None, gt=0, le=86400)     # None: worker default

    @model_validator(mode="after")
    def _seeds_fit(self):
        if self.seed is not None and self.seed + self.n - 1 >= MAX_SEED:
            raise ValueError(f"seed + n - 1 must be < 2**63 (image k uses seed + k), got seed={self.seed}")
        return self

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
                    seed=(self.seed or 0) + k)

    def params(self) -> dict:
        """Generation parameters as shown to the owner (job `params`, PNG text chunks)."""
        return self.model_dump(exclude={"owner", "version", "timeout_s"})

    def check(self, info) -> None:
        """Model-dependent validation (model.info.ModelInfo): raises model.errors.InvalidRequest
        naming the field, exactly as the engine would, for every image of the job."""
        from types import SimpleNamespace

        from model.info import check_request

        for k in (0, self.n - 1):
            check_request(info, SimpleNamespace(**self.image_request_kwargs(k)))
