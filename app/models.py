"""The models the API serves (jobs/models.py `deployment`): which exist, what each allows, and
which have a worker. A request is routed by its `model` (absent: the default model) to that
model's queue; an unknown name is a 422 listing the known ones.

What a model allows (ModelInfo) comes from a ready worker of that model when there is one (so
validation matches what actually runs), else from its folder, read once without loading weights
(model/info.py read_model_info). A model with neither (a hub id and no worker yet) cannot be
validated: its requests get 503 until a worker of it is up. A model without a worker still
queues: its jobs wait, with their queue_position, until one starts.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import fields, replace

from latentd.app.errors import ApiError
from latentd.jobs.models import ModelEntry
from latentd.model.errors import ModelLoadError
from latentd.model.info import ModelInfo, read_model_info

log = logging.getLogger("latentd.api")


def info_from_dict(d: dict) -> ModelInfo:
    names = {f.name for f in fields(ModelInfo)}
    kw = {k: v for k, v in d.items() if k in names}
    for k in ("sizes",):
        kw[k] = tuple(tuple(s) for s in kw.get(k, ()))
    for k in ("samplers", "karras_samplers", "few_step_samplers"):
        if k in kw:
            kw[k] = tuple(kw[k])
    if kw.get("classifier"):
        kw["classifier"] = {h: tuple(v) for h, v in kw["classifier"].items()}
    return ModelInfo(**kw)


def read_local(entry: ModelEntry) -> ModelInfo | None:
    """The model's info from its folder (named as the deployment names it); None when the API
    cannot read it (a hub id, a folder only the workers mount)."""
    if not os.path.exists(entry.source):
        return None
    try:
        return replace(read_model_info(entry.source), name=entry.name)
    except ModelLoadError as e:
        log.warning("model %s: cannot read %s (%s); its workers will tell", entry.name, entry.source, e)
        return None


class ModelSource:
    """The deployment's models with their info and ready workers (cached for ttl_s)."""

    def __init__(self, jobs, ttl_s: float = 2.0):
        self.jobs, self.ttl_s = jobs, ttl_s
        self.entries: list[ModelEntry] = jobs.deployed
        self.default = self.entries[0]
        self.local = {e.name: read_local(e) for e in self.entries}
        self._at, self._workers = -1e9, {}

    def workers(self, fresh: bool = False) -> dict[str, list[dict]]:
        """Model name -> its ready workers (an empty list: none)."""
        if fresh or time.monotonic() - self._at > self.ttl_s:
            self._workers = self.jobs.workers_by_model()
            self._at = time.monotonic()
        return self._workers

    def info(self, entry: ModelEntry) -> ModelInfo | None:
        for w in self.workers().get(entry.name, ()):
            if w.get("model"):
                return replace(info_from_dict(w["model"]), name=entry.name)
        return self.local.get(entry.name)

    def all(self) -> list[tuple[ModelEntry, ModelInfo | None, int]]:
        """(entry, info or None, ready workers) of every model, the default first."""
        ws = self.workers()
        return [(e, self.info(e), len(ws.get(e.name, ()))) for e in self.entries]

    def pick(self, name: str | None) -> tuple[ModelEntry, ModelInfo]:
        """The named model (absent: the default) and its info. ApiError 422 for an unknown name,
        503 when the model's limits are not known yet (no folder to read, no worker)."""
        entry = self.default if name is None else next((e for e in self.entries if e.name == name), None)
        if entry is None:
            known = [e.name for e in self.entries]
            raise ApiError(422, "invalid_value", f"model: unknown model {name!r}; known: "
                           f"{', '.join(known)}", "model", known)
        info = self.info(entry)
        if info is None:
            raise ApiError(503, "not_ready", f"model {entry.name!r}: no worker has it loaded yet and "
                           "its folder is not readable here; retry later", "model", None)
        return entry, info
