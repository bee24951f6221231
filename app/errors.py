"""Error bodies: every rejection is `{"error": {code, message, field, allowed}}` (plus OpenAI's
`type`/`param`, so the `openai` client reports it), never a bare 500. The FastAPI handlers that
render them are in app/handlers.py.

Pydantic's errors become 422 naming the first bad field and its allowed range; unreadable bodies
(invalid JSON or UTF-8) name `body`; an oversized body is 413.
"""
from __future__ import annotations

import math

from pydantic import BaseModel


class ApiError(Exception):
    """Raised by routes and deps; rendered by `api_error_handler`."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 allowed: object = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.field, self.allowed, self.headers = field, allowed, headers


def error_body(code: str, message: str, field: str | None = None, allowed: object = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"code": code, "message": message, "field": field, "allowed": allowed,
                      "type": kind, "param": field}}


def _field_of(loc: tuple) -> str:
    """("body", "steps") -> "steps"; ("path", "k") -> "k"; ("body",) -> "body"."""
    parts = [str(p) for p in (loc[1:] if loc[:1] in (("body",), ("query",), ("path",), ("header",))
                              else loc)]
    return ".".join(parts) or "body"


def _allowed_of(err: dict) -> object:
    ctx = err.get("ctx") or {}
    lo = next((ctx[k] for k in ("ge", "gt", "min_length") if k in ctx), None)
    hi = next((ctx[k] for k in ("le", "lt", "max_length") if k in ctx), None)
    if "expected" in ctx:
        return str(ctx["expected"])
    if lo is not None or hi is not None:
        return {"min": lo, "max": hi}
    t = err.get("type", "")
    for word, what in (("int", "an integer"), ("float", "a finite number"), ("bool", "true or false"),
                       ("string", "a string"), ("finite", "a finite number")):
        if word in t:
            return what
    return None


def _json_safe(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):          # {"min": 1, "max": 16} stays a JSON object, not its repr
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)


def error_from(errs: list, prefix: tuple = (), model: type[BaseModel] | None = None) -> ApiError:
    """The ApiError for the first of pydantic's errors (`prefix` is prepended to each loc, e.g.
    ("body",) for errors of model_validate_json, whose locs are relative to the body). `model`:
    the request model validated, whose declared bounds complete a one-sided range."""
    err = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": "invalid"}
    loc = prefix + tuple(err.get("loc") or ())
    kind = err.get("type", "")
    if kind == "json_invalid" or (kind == "value_error" and loc in ((), ("body",))):
        detail = (err.get("ctx") or {}).get("error", "") or err.get("msg", "")
        return ApiError(400, "invalid_json", f"request body is not valid UTF-8 JSON: {detail}",
                        "body", "a UTF-8 JSON object")
    field = _field_of(loc or ("body",))
    if kind == "extra_forbidden":
        return ApiError(422, "unknown_field", f"{field}: unknown field", field, None)
    if kind == "missing":
        return ApiError(422, "missing_field", f"{field}: field required", field, None)
    if field == "body":
        return ApiError(422, "invalid_body", "request body must be a JSON object", "body", "a JSON object")
    allowed = _allowed_of(err)
    if isinstance(allowed, dict):    # both ends of the range, not only the one that failed
        allowed = {**_field_bounds(model, field), **{k: v for k, v in allowed.items() if v is not None}}
    return ApiError(422, "invalid_value", f"{field}: {err.get('msg', 'invalid value')}", field,
                    _json_safe(allowed))


def _field_bounds(model: type[BaseModel] | None, field: str) -> dict:
    """The declared bounds of a request field ({"min": 1, "max": 16} for n)."""
    info = model.model_fields.get(field) if model is not None else None
    out: dict = {}
    for m in getattr(info, "metadata", None) or ():
        for attr, key in (("ge", "min"), ("gt", "min"), ("min_length", "min"),
                          ("le", "max"), ("lt", "max"), ("max_length", "max")):
            if getattr(m, attr, None) is not None:
                out.setdefault(key, getattr(m, attr))
    return out


def too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"request body too large (max {limit} bytes)", "body",
                    {"max_bytes": limit}, headers={"Connection": "close"})
