"""Pydantic models derived from the request declaration (jobs/request.py): the API's request
bodies and JobSpec's fields. Nothing here names a field; every type, default, bound and help text
is the declaration's.

  api_model(surface, strict=True)   JSON bodies: strict (no "2" for 2, no 1 for true), closed
  api_model("edit", strict=False)   the multipart form: lax (every form value is a string);
                                    classifier_guidance and loras arrive as JSON strings
  spec_fields()                     JobSpec's request fields (strict ints and bools)
"""
from __future__ import annotations

import json
from typing import Annotated, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field as PydanticField, StrictBool, StrictInt
from pydantic import WithJsonSchema, create_model

from latentd.jobs.request import (ADAPTERS, LORA_NAME_CHARS, LORA_SCALE, MODEL, REQUIRED, SPEC_DEFAULTS,
                                  Field, on)

UPLOADS = ("image", "mask")         # files in a multipart form, not text fields
GUIDANCE_TYPE = dict[str, str | float | None]
LoraName = Annotated[str, PydanticField(min_length=1, max_length=LORA_NAME_CHARS)]
LoraScale = Annotated[float, PydanticField(ge=LORA_SCALE[0], le=LORA_SCALE[1], allow_inf_nan=False)]


class LoraRef(BaseModel):
    """One adapter of a request body's `loras`."""

    model_config = ConfigDict(extra="forbid")

    name: LoraName = PydanticField(description="An adapter's name (GET /v1/loras)")
    scale: LoraScale = PydanticField(1.0, description="How much of the adapter")


def _json_in_form(kind: type, example: str):
    """A form's structured field: JSON in a text field (`kind`: dict or list)."""
    def parse(v):
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                raise ValueError(f"must be a JSON {kind.__name__} like {example}") from None
            if not isinstance(v, kind):
                raise ValueError(f"must be a JSON {kind.__name__} like {example}")
        return v
    return parse


# inline, not a $ref: the routes put these schemas into the OpenAPI document as they are
LoraItem = Annotated[LoraRef, WithJsonSchema(LoraRef.model_json_schema())]
# the API's type of a declared type, and how a form sends it (JSON in a text field)
API_TYPES = {dict: (GUIDANCE_TYPE, _json_in_form(dict, '{"color": "red", "scale": 2.0}')),
             ADAPTERS: (list[LoraItem], _json_in_form(list, '[{"name": "star", "scale": 0.8}]'))}


def _api_default(f: Field):
    """A body's default: the declared value when it is one, else None (absent: resolved later)."""
    if f.default is REQUIRED:
        return ...
    if f.default is MODEL or isinstance(f.default, dict):
        return None
    return f.default


def _description(f: Field) -> str:
    return f.help if f.default in (None, REQUIRED, ()) else f"{f.help} (default: {f.default_text()})"


def _api_field(f: Field, form: bool):
    t, from_form = API_TYPES.get(f.type, (f.type, None))
    default = _api_default(f)
    if default is None or default == ():
        t, default = Optional[t], None
    if form and from_form is not None:
        t = Annotated[t, BeforeValidator(from_form),
                      WithJsonSchema({"type": "string", "description": _description(f)})]
    kw = dict(f.bounds)
    if f.type is float:
        kw["allow_inf_nan"] = False
    return t, PydanticField(default, description=_description(f), **kw)


def api_model(surface: str, name: str, doc: str, *, strict: bool = True) -> type[BaseModel]:
    """The request body of an API surface ("generation", "job" or "edit")."""
    form = not strict
    fields = {f.name: _api_field(f, form) for f in on(surface) if not (form and f.name in UPLOADS)}
    cfg = ConfigDict(extra="forbid", strict=strict)
    return create_model(name, __config__=cfg, __doc__=doc, **fields)


def _spec_type(f: Field):
    if f.type == ADAPTERS:
        return tuple[tuple[LoraName, LoraScale], ...]
    return {int: StrictInt, bool: StrictBool}.get(f.type, f.type)


def spec_fields() -> dict:
    """JobSpec's request fields for create_model: name -> (type, FieldInfo)."""
    out = {}
    for f in on("spec"):
        t = _spec_type(f)
        if f.default is REQUIRED:
            default = ...
        elif f.default is MODEL:
            default = SPEC_DEFAULTS[f.name]
        elif isinstance(f.default, dict):      # per kind: resolved before a spec is made
            default = None
        else:
            default = f.default
        if default is None:
            t = Optional[t]
        out[f.name] = (t, PydanticField(default, description=f.help, **f.bounds))
    return out
