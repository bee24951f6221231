"""Pydantic models derived from the request declaration (jobs/request.py): the API's request
bodies and JobSpec's fields. Nothing here names a field; every type, default, bound and help text
is the declaration's.

  api_model(surface, strict=True)   JSON bodies: strict (no "2" for 2, no 1 for true), closed
  api_model("edit", strict=False)   the multipart form: lax (every form value is a string);
                                    classifier_guidance arrives as a JSON object string
  spec_fields()                     JobSpec's request fields (strict ints and bools)
"""
from __future__ import annotations

import json
from typing import Annotated, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field as PydanticField, StrictBool, StrictInt
from pydantic import WithJsonSchema, create_model

from latentd.jobs.request import MODEL, REQUIRED, SPEC_DEFAULTS, Field, on

UPLOADS = ("image", "mask")         # files in a multipart form, not text fields
GUIDANCE_TYPE = dict[str, str | float | None]


def _json_object(v):
    """A form's classifier_guidance: a JSON object in a text field."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            raise ValueError('must be a JSON object like {"color": "red", "scale": 2.0}') from None
        if not isinstance(v, dict):
            raise ValueError('must be a JSON object like {"color": "red", "scale": 2.0}')
    return v


def _api_default(f: Field):
    """A body's default: the declared value when it is one, else None (absent: resolved later)."""
    if f.default is REQUIRED:
        return ...
    if f.default is MODEL or isinstance(f.default, dict):
        return None
    return f.default


def _description(f: Field) -> str:
    return f.help if f.default in (None, REQUIRED) else f"{f.help} (default: {f.default_text()})"


def _api_field(f: Field, form: bool):
    t = GUIDANCE_TYPE if f.type is dict else f.type
    default = _api_default(f)
    if default is None:
        t = Optional[t]
    if form and f.type is dict:
        t = Annotated[t, BeforeValidator(_json_object),
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
