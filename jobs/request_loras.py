"""A request's LoRA adapters, resolved once (jobs/request_resolve.py calls this for every surface).

Two ways to ask for one, merged: the `loras` field ([{"name", "scale"}]) and AUTOMATIC1111's
prompt syntax `<lora:NAME:SCALE>` (`<lora:NAME>`: scale 1). A tag is taken out of the prompt
before it is encoded (the whitespace around it collapsed to one space), so the job's prompt and
`revised_prompt` are the text alone. The same name twice, more than MAX_LORAS, a scale out of
LORA_SCALE, `<lyco:...>` or a tag in the negative prompt: InvalidRequest naming the field the
problem came from (`loras` or `prompt`). `check(name)` (the API's: is there such an adapter for
this model?) returns None or why not. The result is ((name, scale), ...) sorted by name.
"""
from __future__ import annotations

import math
import re

from latentd.jobs.request import LORA_SCALE, MAX_LORAS
from latentd.model.errors import InvalidRequest

TAG = re.compile(r"<\s*(lora|lyco)\s*:([^<>]*)>", re.IGNORECASE)
_TAG_SPACED = re.compile(r"\s*" + TAG.pattern + r"\s*", re.IGNORECASE)
SYNTAX = "<lora:NAME> or <lora:NAME:SCALE>"


def _scale(value, field: str, what: str) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        s = math.nan
    if isinstance(value, bool) or not math.isfinite(s) or not LORA_SCALE[0] <= s <= LORA_SCALE[1]:
        raise InvalidRequest(field, f"{what}: scale must be a number from {LORA_SCALE[0]:g} to "
                                    f"{LORA_SCALE[1]:g}, got {value!r}", {"min": LORA_SCALE[0], "max": LORA_SCALE[1]})
    return s


def from_prompt(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(the prompt without its <lora:...> tags, [(name, scale), ...] in the order written)."""
    found = []
    for m in TAG.finditer(prompt):
        tag, args = m.group(0), m.group(2).split(":")
        if m.group(1).lower() == "lyco":
            raise InvalidRequest("prompt", f"{tag}: LyCORIS tags are not supported; latentd runs LoRA "
                                           f"(and LoCon) files, written {SYNTAX}", SYNTAX)
        name = args[0].strip()
        if not name or len(args) > 2:
            raise InvalidRequest("prompt", f"{tag}: expected {SYNTAX} (one scale for the whole "
                                           "adapter)", SYNTAX)
        found.append((name, 1.0 if len(args) == 1 else _scale(args[1].strip(), "prompt", tag)))
    if not found:
        return prompt, []
    return _TAG_SPACED.sub(" ", prompt).strip(), found


def _pairs(loras) -> list[tuple[str, float]]:
    """The `loras` field as sent ({"name", "scale"} objects or mappings, or (name, scale) pairs)."""
    if loras is None:
        return []
    if isinstance(loras, (str, bytes)) or not hasattr(loras, "__iter__"):
        raise InvalidRequest("loras", 'must be a list like [{"name": "star", "scale": 0.8}]', "a list")
    out = []
    for item in loras:
        if isinstance(item, dict):
            name, scale = item.get("name"), item.get("scale", 1.0)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            name, scale = item
        else:
            name, scale = getattr(item, "name", None), getattr(item, "scale", 1.0)
        if not isinstance(name, str) or not name:
            raise InvalidRequest("loras", f"each adapter needs a name, got {name!r}", "an adapter name")
        out.append((name, _scale(scale, "loras", name)))
    return out


def resolve_loras(prompt: str, negative_prompt: str, loras, check=None) -> tuple[str, tuple]:
    """(the prompt without tags, ((name, scale), ...) sorted by name)."""
    if TAG.search(negative_prompt or ""):
        raise InvalidRequest("negative_prompt", "a <lora:...> tag applies to the whole request: put "
                                                "it in the prompt (or in loras)", SYNTAX)
    prompt, tagged = from_prompt(prompt)
    asked = [("loras", p) for p in _pairs(loras)] + [("prompt", p) for p in tagged]
    seen: dict[str, str] = {}
    for field, (name, _) in asked:
        if name in seen:
            where = ("loras" if field == "loras" else "the prompt") if seen[name] == field \
                else "the prompt and in loras"
            raise InvalidRequest(field, f"adapter {name!r} is named twice (in {where}); name each "
                                        "adapter once, with one scale", "each adapter once")
        seen[name] = field
        if len(seen) > MAX_LORAS:
            raise InvalidRequest(field, f"at most {MAX_LORAS} adapters per request", {"max": MAX_LORAS})
        problem = check(name) if check is not None else None
        if problem:
            raise InvalidRequest(field, problem, "an adapter of GET /v1/loras for this model")
    return prompt, tuple(sorted(pair for _, pair in asked))


def as_tags(loras) -> str:
    """A job's adapters written back as prompt tags (A1111's infotext keeps them in its prompt)."""
    return "".join(f" <lora:{name}:{scale:g}>" for name, scale in loras or ())
