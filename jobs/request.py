"""The request, declared once: every field a caller can send, and every resolved field a job carries.

One `Field` record per field says its type, its default, its static bounds, the kinds of request
that use it (text / img2img / inpaint) and the surfaces that carry it:

    generation   the JSON body of POST /v1/images/generations (OpenAI's images.generate + extensions)
    job          the JSON body of POST /v1/jobs (a generation, or an edit with base64 uploads)
    edit         the multipart form of POST /v1/images/edits (and multipart POST /v1/jobs)
    spec         jobs/spec.py JobSpec: what crosses the queue, every value resolved
    cli          `latentd generate` flags, local and `--server` (which sends the `job` body)
    playground   the form of app/static (checked against this by tests/test_request_surfaces.py)

Derived from it: the API's pydantic models (app/schemas.py via jobs/request_models.py), JobSpec's
fields, the CLI flags and the --server body (latentd/cmd_generate.py, cmd_remote.py). Service
policy lives here too (images per request, prompt length, upload pixels, output formats);
what a model allows is model/request.py's. jobs/request_resolve.py fills the defaults once.

A request field that a job carries under other names says so in `spec_as` (size -> width,
height; image / mask -> kind; classifier_guidance -> classifier_targets, classifier_scale).
`loras` keeps its name: a list of {"name", "scale"} objects in a body, ((name, scale), ...) sorted
by name in a job, with the prompt's <lora:NAME:SCALE> tags merged in.
Torch-free and pydantic-free: the declaration is data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from latentd.model.classifier_spec import DEFAULT_SCALE, MAX_SCALE as MAX_CLASSIFIER_SCALE
from latentd.model.request import (DEFAULT_ETA, DEFAULT_GUIDANCE, DEFAULT_KARRAS, DEFAULT_SAMPLER, DEFAULT_STEPS,
                                   DEFAULT_STRENGTH, ETA_SAMPLERS, GRID_SAMPLERS, KINDS, MAX_CACHE_INTERVAL,
                                   MAX_ETA, MAX_SEED, SAMPLERS, SPACING_SAMPLERS, SPACINGS)

MAX_N = 16                  # images per request, the hard cap (deployments lower it: LATENTD_MAX_N)
MAX_PROMPT_CHARS = 4000     # the text encoder truncates at 77 tokens anyway; this bounds payloads
MAX_IMAGE_PIXELS = 4096 * 4096   # an uploaded init image / mask, before it is resized
MAX_DEADLINE_S = 86400      # a day: a job that may wait longer has no deadline worth stating
OUTPUT_FORMATS = ("png", "jpeg", "webp")
# OpenAI's quality: a step preset of the model (model/info.py ModelInfo.quality_steps); auto is
# the model's default (medium), DALL-E's standard / hd are medium / high
QUALITIES = ("low", "medium", "high", "auto", "standard", "hd")
QUALITY_AS = {"auto": "medium", "standard": "medium", "hd": "high"}
BACKGROUNDS = ("transparent", "opaque", "auto")     # latentd draws opaque only (no alpha channel)
MODERATIONS = ("auto", "low")
# claim and batch order (jobs/state.py CLAIM, worker/scheduler.py); a key's cap: app/auth.py
PRIORITIES = ("high", "normal", "low")       # low: a permitted key's flagged images come back unredacted
# an edit's default strength by OpenAI's input_fidelity (absent: model/request.py DEFAULT_STRENGTH)
FIDELITY_STRENGTH = {"high": {"img2img": 0.5, "inpaint": 0.75}, "low": {"img2img": 0.9, "inpaint": 1.0}}
# LoRA adapters (model/lora_catalog.py names them): per request, and each one's scale
MAX_LORAS = 8
LORA_SCALE = (-5.0, 5.0)    # min, max
LORA_NAME_CHARS = 200
ADAPTERS = tuple[tuple[str, float], ...]    # the loras type: ((name, scale), ...), by name
SURFACES = ("generation", "job", "edit", "spec", "cli", "playground")
EDITS = ("img2img", "inpaint")


REQUIRED = ...              # the default of a field that must be sent (prompt)


class _ModelDefault:
    def __repr__(self) -> str:
        return "MODEL"


MODEL = _ModelDefault()     # default: the model's (model/info.py ModelInfo.default_*)


@dataclass(frozen=True)
class Limits:
    """Deployment bounds (LATENTD_MAX_N, LATENTD_MAX_PROMPT_CHARS, LATENTD_MAX_IMAGE_PIXELS)."""

    max_n: int = MAX_N
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_image_pixels: int = MAX_IMAGE_PIXELS

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        return cls(max_n=min(int(settings.max_n), MAX_N),
                   max_prompt_chars=min(int(settings.max_prompt_chars), MAX_PROMPT_CHARS),
                   max_image_pixels=int(getattr(settings, "max_image_pixels", MAX_IMAGE_PIXELS)))


@dataclass(frozen=True)
class Field:
    name: str
    type: object                    # the type of a value: str, int, float, bool, dict, a Literal
    help: str
    on: frozenset                   # the surfaces that carry it (SURFACES)
    default: object = None          # a value; None: absent; MODEL: the model's; a dict: per kind
    bounds: dict = field(default_factory=dict)   # static: ge, gt, le, lt, min_length, max_length
    kinds: tuple = KINDS            # the kinds of request that use it
    spec_as: tuple | None = None    # the JobSpec fields it resolves to (None: itself, if on spec)
    flag: str | None = None         # the CLI flag (None: --name-with-dashes; "": positional)

    @property
    def cli_flag(self) -> str:
        return self.name if self.flag == "" else (self.flag or "--" + self.name.replace("_", "-"))

    def default_text(self) -> str:
        d = self.default
        if d is REQUIRED:
            return "required"
        if d is MODEL:
            return "the model's"
        if isinstance(d, dict):
            return ", ".join(f"{v:g} {k}" for k, v in d.items())
        return "none" if d is None or d == () else repr(d)


def _on(*names: str) -> frozenset:
    bad = set(names) - set(SURFACES)
    assert not bad, bad
    return frozenset(names)


ALL_API = ("generation", "job", "edit")
FIELDS: tuple[Field, ...] = (
    Field("prompt", str, "What to draw; may be empty only with classifier_guidance",
          _on(*ALL_API, "spec", "cli", "playground"), default=REQUIRED, flag="",
          bounds={"max_length": MAX_PROMPT_CHARS}),
    Field("negative_prompt", str, "What to steer away from (empty: unconditional)",
          _on(*ALL_API, "spec", "cli", "playground"), default="", flag="--negative",
          bounds={"max_length": MAX_PROMPT_CHARS}),
    Field("n", int, "Images to generate; image k uses seed + k (deployment cap: LATENTD_MAX_N)",
          _on(*ALL_API, "spec", "playground"), default=1, bounds={"ge": 1, "le": MAX_N}),
    Field("size", str, '"WxH", e.g. "512x512", or "auto"; absent: the model\'s native size, an edit\'s '
                       "the image's", _on(*ALL_API, "cli", "playground"), default=MODEL,
          bounds={"max_length": 16}, spec_as=("width", "height")),
    Field("steps", int, "Denoising steps", _on(*ALL_API, "spec", "cli", "playground"), default=MODEL,
          bounds={"ge": 1, "le": 1000}),
    Field("guidance_scale", float, "Classifier-free guidance scale",
          _on(*ALL_API, "spec", "cli", "playground"), default=MODEL, bounds={"ge": 0, "le": 100},
          flag="--guidance"),
    Field("sampler", str, "One of the model's samplers (" + ", ".join(SAMPLERS) + "); the few-step "
          f"{' and '.join(GRID_SAMPLERS)} only on a model or with an adapter in loras meant for them "
          "(GET /v1/models: standalone_samplers, each adapter's meant_for)",
          _on(*ALL_API, "spec", "cli", "playground"), default=MODEL, bounds={"max_length": 32}),
    Field("karras", bool, "Karras sigmas (euler, euler_a, dpmpp_2m)", _on(*ALL_API, "spec", "cli"),
          default=MODEL),
    Field("eta", float, f"DDIM's eta and TCD's gamma ({' and '.join(ETA_SAMPLERS)} only; 0 = deterministic, "
          f"0 to {MAX_ETA:g}); absent: the sampler's default (" + ", ".join(
              f"{v:g} for {k}" for k, v in DEFAULT_ETA.items()) + ", else 0)",
          _on(*ALL_API, "spec", "cli"), bounds={"ge": 0, "le": MAX_ETA}),
    Field("timestep_spacing", Literal[SPACINGS], " | ".join(SPACINGS) + ": where the steps fall "
          "on the training schedule (trailing: Lin et al. 2024, ends at the last timestep); absent: the "
          f"model's scheduler config. For {', '.join(SPACING_SAMPLERS)} (not "
          f"{' or '.join(GRID_SAMPLERS)}: they step on their own grid)", _on(*ALL_API, "spec", "cli")),
    Field("cache_interval", int, "DeepCache: a full U-Net step every N steps (and near the end), a "
          "cheaper step reusing the deep features between (1 = every step in full; 2-3 save time at a "
          "small cost in detail), "
          f"1 to {MAX_CACHE_INTERVAL}", _on(*ALL_API, "spec", "cli"), default=1,
          bounds={"ge": 1, "le": MAX_CACHE_INTERVAL}),
    Field("seed", int, "Image k uses seed + k; absent: random (returned with each image)",
          _on(*ALL_API, "spec", "cli", "playground"), bounds={"ge": 0, "lt": MAX_SEED}),
    Field("image", str, "Init image (PNG/JPEG/WebP): an edit. JSON: base64; form: a file; CLI: a path",
          _on("job", "edit", "cli"), kinds=EDITS, spec_as=("kind",), flag="--init-image"),
    Field("mask", str, "Mask, same size as the image: transparent or white = repaint (inpainting). "
                       "JSON: base64; form: a file; CLI: a path", _on("job", "edit", "cli"),
          kinds=("inpaint",), spec_as=("kind",)),
    Field("strength", float, "Edits: how much of the schedule runs (0 < s <= 1)",
          _on("job", "edit", "spec", "cli"), default=dict(DEFAULT_STRENGTH), kinds=EDITS,
          bounds={"gt": 0, "le": 1}),
    Field("classifier_guidance", dict,
          'Steer by the model\'s classifier (GET /v1/models lists its attributes): {"color": "red", '
          f'"shape": "triangle", "scale": 2.0}} (scale default {DEFAULT_SCALE:g}); a form sends it as '
          "a JSON string; the CLI as --classify color=red,shape=triangle [--classifier-scale S]",
          _on(*ALL_API, "cli"), spec_as=("classifier_targets", "classifier_scale"), flag="--classify"),
    Field("loras", ADAPTERS, 'LoRA adapters (GET /v1/loras lists them): [{"name": "star", "scale": 0.8}], '
          f"scale {LORA_SCALE[0]:g} to {LORA_SCALE[1]:g} (default 1), at most {MAX_LORAS}; the same as "
          "<lora:NAME:SCALE> (or <lora:NAME>) in the prompt, which is taken out of its text. A form "
          "sends a JSON string; the CLI --lora NAME_OR_PATH[:SCALE], repeated",
          _on(*ALL_API, "spec", "cli"), default=(), bounds={"max_length": MAX_LORAS}, flag="--lora"),
    Field("output_format", Literal[OUTPUT_FORMATS], "png | jpeg | webp", _on(*ALL_API, "spec"),
          default="png"),
    Field("output_compression", int, "JPEG/WebP quality, 0-100 (absent: the encoder's default)",
          _on(*ALL_API, "spec"), bounds={"ge": 0, "le": 100}),
    Field("model", str, "The model: one the service serves (GET /v1/models; absent: its default); "
                        "`latentd generate` without --server: a diffusers folder, .safetensors or hub "
                        "id (absent: LATENTD_MODEL, else the bundled model)",
          _on(*ALL_API, "spec", "cli"), bounds={"max_length": 200}),
    Field("priority", Literal[PRIORITIES], "high | normal | low: claimed and batched before lower "
          "priorities, and a running lower-priority image is parked at a step boundary for it "
          "(capped per API key: `latentd keys create --max-priority`)", _on(*ALL_API, "spec", "cli"),
          default="normal"),
    # how the result is delivered: the API's only
    Field("response_format", Literal["url", "b64_json"], "url or b64_json (POST /v1/jobs: ignored)",
          _on(*ALL_API), default="url"),
    Field("user", str, "End-user id (recorded, not used)", _on(*ALL_API), bounds={"max_length": 256}),
    Field("quality", Literal[QUALITIES], "A steps preset of the model (GET /v1/models: "
          "quality_steps): low, medium, high; auto and standard are medium (the model's default "
          "steps), hd is high; an explicit steps wins", _on(*ALL_API, "spec"), default="auto"),
    Field("background", Literal[BACKGROUNDS], "opaque or auto (the same); transparent is refused: "
          "the model draws no alpha channel", _on(*ALL_API), default="auto"),
    Field("moderation", Literal[MODERATIONS], "auto: flagged images come back black (nsfw: true); "
          "low: unredacted, with nsfw: true (only for keys permitted it: `latentd keys create "
          "--allow-moderation-low`)", _on(*ALL_API, "spec"), default="auto"),
    Field("input_fidelity", Literal[tuple(FIDELITY_STRENGTH)], "Edits: how closely to keep the "
          "image when strength is not sent: " + "; ".join(
              f"{k} = strength {v['img2img']:g} ({v['inpaint']:g} with a mask)"
              for k, v in FIDELITY_STRENGTH.items()), _on("job", "edit"), kinds=EDITS, spec_as=("strength",)),
    Field("style", str, "Accepted for OpenAI compatibility; ignored", _on("generation", "job"),
          bounds={"max_length": 32}),
    Field("stream", bool, "Answer text/event-stream with OpenAI's image_generation.* events "
                          "(POST /v1/jobs: follow GET /v1/jobs/{id}/events instead)",
          _on("generation"), default=False),
    Field("partial_images", int, "Previews to stream per image (with stream)", _on("generation"),
          bounds={"ge": 0, "le": 3}),
    Field("callback_url", str, "POST the job's record here when it ends (a host on the server's "
                               "LATENTD_WEBHOOK_ALLOW)", _on(*ALL_API),
          bounds={"min_length": 1, "max_length": 2048}),
    Field("deadline_s", int, "Seconds from admission the job has: refused at once (429) when the "
          "queue ahead cannot start it in time; failed deadline_exceeded when not started by then "
          "(no step runs), or stopped at its next step when still running then (compute so far "
          f"charged); 1 to {MAX_DEADLINE_S}, absent: none",
          _on(*ALL_API, "spec", "cli"), bounds={"ge": 1, "le": MAX_DEADLINE_S}),
    # what resolving makes of the fields above, as a job carries it
    Field("width", int, "Pixels (resolved from size, the init image or the model's native size; "
                        "a spec built by hand may leave it out: the model's native size)",
          _on("spec"), bounds={"ge": 8, "le": 8192}),
    Field("height", int, "Pixels (as width)", _on("spec"), bounds={"ge": 8, "le": 8192}),
    Field("kind", Literal[KINDS], "text, img2img (an image) or inpaint (an image and a mask)",
          _on("spec"), default="text"),
    Field("classifier_targets", tuple[tuple[str, str], ...], "((attribute, label), ...) sorted",
          _on("spec"), default=(), bounds={"max_length": 8}),
    Field("classifier_scale", float, "Classifier guidance scale (0: none)", _on("spec"), default=0.0,
          bounds={"ge": 0, "le": MAX_CLASSIFIER_SCALE}),
)
BY_NAME = {f.name: f for f in FIELDS}

# JobSpec's defaults for the fields whose request default is the model's: a spec built by hand
# (tests, tools) runs with these (a model without latentd.json overrides has the same); the API
# always sends the model's own, resolved.
SPEC_DEFAULTS = {"steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE, "sampler": DEFAULT_SAMPLER,
                 "karras": DEFAULT_KARRAS}


def on(surface: str) -> tuple[Field, ...]:
    """The fields a surface carries, in declaration order."""
    return tuple(f for f in FIELDS if surface in f.on)


def spec_names() -> tuple[str, ...]:
    """The request fields of a JobSpec (version, owner and timeout_s are the envelope's)."""
    return tuple(f.name for f in on("spec"))


def used_by(kind: str) -> tuple[str, ...]:
    return tuple(f.name for f in FIELDS if kind in f.kinds)
