"""A1111's sampler and scheduler names and the latentd samplers they select.

A1111 (1.9+) names a sampler ("DPM++ 2M") and, separately, a schedule ("Karras"); older clients
send the combined legacy name ("DPM++ 2M Karras") or a k-diffusion alias ("k_euler_a"). Only the
names with an exact latentd equivalent are accepted; anything else is a 422 listing these.
A1111 has no DDPM sampler, so latentd's `ddpm` is reachable only through /v1. LCM and TCD are
few-step samplers: on a model not distilled for them a request needs an adapter meant for them
(<lora:NAME> in the prompt; jobs/request_fewstep.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from latentd.model.request import KARRAS_SAMPLERS


@dataclass(frozen=True)
class SamplerName:
    name: str                 # A1111's name
    sampler: str              # latentd's sampler
    aliases: tuple = ()
    karras: bool = False      # a legacy "... Karras" name: Karras sigmas whatever the scheduler


SAMPLERS = (
    SamplerName("Euler a", "euler_a", ("k_euler_a", "k_euler_ancestral")),
    SamplerName("Euler", "euler", ("k_euler",)),
    SamplerName("DPM++ 2M", "dpmpp_2m", ("k_dpmpp_2m",)),
    SamplerName("DPM++ 2M Karras", "dpmpp_2m", ("k_dpmpp_2m_ka",), karras=True),
    SamplerName("DDIM", "ddim"),
    SamplerName("LCM", "lcm"),
    SamplerName("TCD", "tcd"),
)
# name or label (A1111 accepts both) -> Karras sigmas or not
SCHEDULERS = {"automatic": False, "Automatic": False, "karras": True, "Karras": True}
SCHEDULER_ITEMS = (("automatic", "Automatic"), ("karras", "Karras"))
_BY_NAME = {n: s for s in SAMPLERS for n in (s.name, *s.aliases)}
_BY_NAME.update({n.lower(): s for n, s in list(_BY_NAME.items())})


def sampler_names(available=None) -> list[str]:
    """A1111's names of the samplers a model has (None: all)."""
    return [s.name for s in SAMPLERS if available is None or s.sampler in available]


def sampler_of(name: str | None) -> SamplerName | None:
    return _BY_NAME.get(name) or _BY_NAME.get((name or "").lower())


def a1111_name(sampler: str, karras: bool) -> tuple[str, str]:
    """(A1111 sampler name, scheduler label) of a latentd sampler + karras."""
    name = next((s.name for s in SAMPLERS if s.sampler == sampler and not s.karras), sampler)
    return name, "Karras" if karras and sampler in KARRAS_SAMPLERS else "Automatic"
