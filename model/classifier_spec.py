"""Classifier-guidance request fields, torch-free (the API validates with it as the engine does).

A request asks for  {"color": "red", "shape": "triangle", "background": null, "scale": 2.0}:
any subset of the model's classifier heads (null or absent = not steered) and a scale s >= 0
(Dhariwal & Nichol 2021's gradient scale). Resolved to (targets, scale) with targets a sorted
tuple of (head, label) pairs, hashable and stable.
"""
from __future__ import annotations

import math

from latentd.model.errors import InvalidRequest

FIELD = "classifier_guidance"
MAX_SCALE = 100.0
DEFAULT_SCALE = 1.0


def _allowed(heads) -> dict | None:
    return None if not heads else {**{h: list(v) for h, v in heads.items()}, "scale": {"min": 0, "max": MAX_SCALE}}


def resolve(heads: dict[str, tuple[str, ...]] | None, value) -> tuple[tuple[tuple[str, str], ...], float]:
    """heads: the model's classifier heads -> labels (None: the model has no classifier).
    value: the request's field (a dict, or None). Returns ((head, label), ...), scale."""
    if value is None:
        return (), 0.0
    if not isinstance(value, dict):
        raise InvalidRequest(FIELD, "must be an object like {\"color\": \"red\", \"scale\": 2.0}",
                             _allowed(heads))
    if not heads:
        raise InvalidRequest(FIELD, "this model has no classifier; classifier guidance is not available", None)
    scale = value.get("scale", DEFAULT_SCALE)
    if (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
            or not 0.0 <= scale <= MAX_SCALE):
        raise InvalidRequest(f"{FIELD}.scale", f"must be a number between 0 and {MAX_SCALE:g}, got {scale!r}",
                             {"min": 0, "max": MAX_SCALE})
    targets = tuple(sorted((h, lbl) for h, lbl in value.items() if h != "scale" and lbl is not None))
    if not targets:
        raise InvalidRequest(FIELD, "names no attribute to steer; give at least one of: " + ", ".join(heads),
                             _allowed(heads))
    check_targets(heads, targets, float(scale))
    return targets, float(scale)


def check_targets(heads: dict[str, tuple[str, ...]] | None, targets, scale: float) -> None:
    """Validate resolved ((head, label), ...) and scale against a model's heads (the worker's check
    of a job; fills nothing in). No targets: nothing to check."""
    if not targets:
        return
    if not heads:
        raise InvalidRequest(FIELD, "this model has no classifier; classifier guidance is not available", None)
    if (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
            or not 0.0 <= scale <= MAX_SCALE):
        raise InvalidRequest(f"{FIELD}.scale", f"must be a number between 0 and {MAX_SCALE:g}, got {scale!r}",
                             {"min": 0, "max": MAX_SCALE})
    for head, label in targets:
        if head not in heads:
            raise InvalidRequest(FIELD, f"unknown attribute {head!r}; this model's classifier has: "
                                        + ", ".join(heads) + " (and scale)", _allowed(heads))
        if label not in heads[head]:
            raise InvalidRequest(f"{FIELD}.{head}", f"unknown {head} {label!r}; one of: " + ", ".join(heads[head]),
                                 list(heads[head]))
