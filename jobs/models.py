"""The deployment's models: their names, where their weights are and which queue each one has
(torch-free; the API, the worker and the CLI all read the deployment through `deployment()`).

LATENTD_MODELS is "name=path,name2=path2" (an entry without "name=" is named after its folder or
file); the first is the default model, the one a request without `model` gets. Unset, the
deployment is LATENTD_MODEL alone (else the bundled model), named after its folder, as before.
Each model has its own queue (jobs/keys.py model_queue) and its own workers: a worker serves the
one model LATENTD_WORKER_MODEL names (unset: the default).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from latentd.jobs import keys
from latentd.model.info import BUNDLED

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


@dataclass(frozen=True)
class ModelEntry:
    name: str               # what requests send as `model`
    source: str             # model folder, single *.safetensors file or hub id
    queue: str              # its queue's name (keys.rq_queue(queue) is RQ's list of its jobs)
    default: bool = False


def name_of(source: str) -> str:
    """A model's name when none is given: its folder's (or file's, without the extension, or a
    hub id's last part) name, with anything outside NAME's characters turned into '-'."""
    base = os.path.basename(os.path.normpath(source))
    if base.endswith((".safetensors", ".ckpt")):
        base = os.path.splitext(base)[0]
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", base).lstrip("._-")[:64]
    return base or "model"


def parse(spec: str, what: str = "LATENTD_MODELS") -> list[tuple[str, str]]:
    """"name=path,path2" -> [(name, path), (name_of(path2), path2)]; ValueError naming `what`."""
    out: list[tuple[str, str]] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        name, eq, path = item.partition("=")
        name, path = (name.strip(), path.strip()) if eq else (name_of(item), item)
        if not path:
            raise ValueError(f"{what}: {item!r} names no model folder (expected name=path)")
        if not NAME.match(name):
            raise ValueError(f"{what}: model name {name!r} is not allowed ({NAME_RULE})")
        if name in (n for n, _ in out):
            raise ValueError(f"{what}: model {name!r} is listed twice")
        out.append((name, path))
    return out


def pairs_of(settings) -> list[tuple[str, str]]:
    if (settings.models or "").strip():
        pairs = parse(settings.models)
        if pairs:
            return pairs
    source = settings.model or BUNDLED
    return [(name_of(source), source)]


def deployment(settings) -> list[ModelEntry]:
    """Every model of the deployment, the default first. ValueError for a bad LATENTD_MODELS."""
    pairs = pairs_of(settings)
    default = pairs[0][0]
    return [ModelEntry(n, p, keys.model_queue(settings.queue_name, n, default), i == 0)
            for i, (n, p) in enumerate(pairs)]


def served(settings) -> ModelEntry:
    """The model a worker with these settings serves (LATENTD_WORKER_MODEL, else the default)."""
    entries = deployment(settings)
    want = settings.worker_model
    for e in entries:
        if want is None or e.name == want:
            return e
    raise ValueError(f"LATENTD_WORKER_MODEL: {want!r} is not a model of the deployment "
                     f"(LATENTD_MODELS: {', '.join(e.name for e in entries)})")


def with_cli(settings, given: list[str]) -> tuple[str, list[str]]:
    """`--model` flags (repeatable: "name=path", "path", or the name of a model the deployment
    already lists) merged into the deployment: (the LATENTD_MODELS value, the names given).
    Without LATENTD_MODELS the flags are the deployment (the first is its default); with it, a new
    name is added after the listed ones and a listed name given with a path takes that path."""
    listed = parse(settings.models) if (settings.models or "").strip() else []
    known = dict(listed)
    names: list[str] = []
    for item in given:
        if "=" not in item and item.strip() in known:
            names.append(item.strip())
            continue
        ((name, path),) = parse(item, "--model")
        if name not in known:
            listed.append((name, path))
        else:
            listed = [(n, path if n == name else p) for n, p in listed]
        known[name] = path
        if name in names:
            raise ValueError(f"--model: model {name!r} is given twice")
        names.append(name)
    return ",".join(f"{n}={p}" for n, p in listed), names


def settings_with_flags(given: list[str] | None):
    """The settings of a command that starts the API or workers as child processes, with its
    `--model` flags as the whole deployment: they replace LATENTD_MODELS in this process's
    environment, which the children inherit. Raises ValueError naming --model."""
    import os

    from latentd.config.settings import get_settings

    get_settings.cache_clear()
    if given:
        os.environ["LATENTD_MODELS"] = with_cli(get_settings().model_copy(update={"models": ""}), given)[0]
        get_settings.cache_clear()
    return get_settings()
