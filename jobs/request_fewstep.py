"""The few-step gate, at admission (jobs/request_resolve.py calls it for the API and the CLI).

The few-step samplers (model/request.py GRID_SAMPLERS: lcm, tcd) run on any model, but only a
model or an adapter distilled for them draws a picture in a few steps; elsewhere they give poor
images. So a request may name one only
- on a model meant for it (its latentd.json `few_step_samplers`: ModelInfo.standalone_samplers), or
- with an adapter in its loras, at a positive scale, whose metadata says it is meant for it
  (model/lora_catalog.py meant_for: {"samplers": [...], ...}).
Otherwise: InvalidRequest naming `sampler`, saying why, its allowed values the samplers the model
takes by itself and the adapters that enable each few-step sampler.

Steps outside an adapter's meant_for.steps, or another guidance than its guidance_scale, are
allowed: more steps still work (lcm takes up to its grid's points), and the listings (GET
/v1/models, /v1/loras) say what the adapter is meant for. The worker does not gate again: it
checks what the engine can run (model/request.py check).
"""
from __future__ import annotations

from latentd.model.errors import InvalidRequest
from latentd.model.request import GRID_SAMPLERS


def check_few_step(info, sampler: str, loras, adapters_meant_for=None) -> None:
    """loras: the request's ((name, scale), ...); adapters_meant_for() -> {adapter name: its
    meant_for} of the adapters the model can use and those the request named (None: no adapters
    known, as for a caller without adapter folders)."""
    if sampler not in GRID_SAMPLERS or sampler in info.few_step_samplers:
        return
    meant = adapters_meant_for() if adapters_meant_for is not None else {}
    enabling = {s: sorted(n for n, m in meant.items() if s in m.get("samplers", ())) for s in GRID_SAMPLERS}
    if any(name in enabling[sampler] and scale > 0 for name, scale in loras):
        return
    fix = (f"add an adapter meant for it to loras ({', '.join(enabling[sampler])})" if enabling[sampler]
           else "it has no adapter meant for it (an adapter's metadata lists it in meant_for.samplers)")
    raise InvalidRequest("sampler", f"{sampler} is a few-step sampler for models distilled for it, and model "
                                    f"{info.name!r} is not: {fix}; or use one of "
                                    f"{', '.join(info.standalone_samplers)}",
                         {"samplers": list(info.standalone_samplers), "adapters": enabling})
