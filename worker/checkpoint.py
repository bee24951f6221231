"""Checkpoints: each running image's row state (model/row_state.py) saved to Redis every few
steps, so a requeued job resumes on another worker where its last save left it.

When: a row is due once it has run `every_steps` steps since its last save (or since it was
admitted or resumed), or `every_s` seconds have passed with at least one step run; `force`
(a graceful stop) saves every row that moved. So a SIGKILL loses at most `every_steps` steps of
each image. Saving is the ledger's (worker/ledger.py save_rows): one fenced Lua call per job
(jobs/state.py SAVE_ROWS, attempt-fenced like every worker write) in one round trip per tick.

Which rows resume: a saved row is used only if its tags say it was saved for this job, this
spec (sha256 of the spec JSON in the record), this image and this model, by an earlier attempt;
the engine then checks it against the request and plan itself (Pipeline.resume). Anything else
is ignored (counted by reason) and the image starts over.
"""
from __future__ import annotations

import hashlib
import logging

from latentd.model.row_state import RowState, RowStateError, model_identity
from latentd.worker import metrics

log = logging.getLogger("latentd.worker")


def spec_hash(spec_json: bytes | str) -> str:
    """The job spec's identity as the record stores it (the same bytes for every attempt)."""
    data = spec_json.encode() if isinstance(spec_json, str) else bytes(spec_json)
    return hashlib.sha256(data).hexdigest()[:24]


class Checkpointer:
    def __init__(self, pipe, model_name: str, every_steps: int, every_s: float):
        self.pipe = pipe
        self.model_name = model_name
        self.every_steps = int(every_steps)
        self.every_s = float(every_s)
        self._last: dict[str, tuple[int, float]] = {}   # request id -> (step saved, monotonic time)
        self._spec: dict[str, str] = {}                  # job id -> spec_hash
        self._urgent: set[str] = set()                   # request ids to save at the next save

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0 or self.every_s > 0

    def meta(self, job_id: str, attempt: int, k: int) -> dict:
        return {"job": job_id, "attempt": attempt, "spec": self._spec.get(job_id, ""), "k": k,
                "model": self.model_name}

    # --- resume ------------------------------------------------------------------------------
    def usable(self, job_id: str, attempt: int, spec_json: bytes, saved: dict[int, bytes],
               todo) -> dict[int, RowState]:
        """The saved rows (image index -> bytes, from Redis) that this claim may resume, among
        the images `todo`; the others are logged and counted, never used."""
        self._spec[job_id] = want = spec_hash(spec_json)
        out = {}
        for k, data in saved.items():
            if k not in todo:
                continue
            try:
                row = RowState.from_bytes(data)
            except RowStateError as e:
                self._ignore(job_id, k, "unreadable", str(e))
                continue
            m = row.meta
            if m.get("job") != job_id:
                self._ignore(job_id, k, "other_job", f"saved for job {m.get('job')!r}")
            elif m.get("spec") != want:
                self._ignore(job_id, k, "other_spec", "saved for another spec")
            elif m.get("k") != k:
                self._ignore(job_id, k, "other_image", f"saved for image {m.get('k')!r}")
            elif m.get("model") != self.model_name or row.model != model_identity(self.pipe):
                self._ignore(job_id, k, "other_model", f"saved on model {m.get('model')!r} ({row.model})")
            elif not isinstance(m.get("attempt"), int) or m["attempt"] >= attempt:
                self._ignore(job_id, k, "other_attempt", f"saved by attempt {m.get('attempt')!r}")
            else:
                out[k] = row
        return out

    @staticmethod
    def _ignore(job_id: str, k: int, reason: str, why: str) -> None:
        metrics.CHECKPOINTS_IGNORED.labels(reason=reason).inc()
        log.warning("job %s image %d: saved row state ignored (%s): %s", job_id, k, reason, why)

    def urgent(self, rid: str) -> None:
        """Save this row at the next save whatever the schedule (a parked row: if this worker
        stops before it runs on, another resumes it where it was parked)."""
        self._urgent.add(rid)

    def resumed(self, rid: str, step: int, now: float) -> None:
        """The request was admitted at `step` from its saved row: the next save counts from there."""
        self._last[rid] = (step, now)

    # --- save --------------------------------------------------------------------------------
    def due(self, held, ex, now: float, force: bool = False) -> list[tuple]:
        """[(Held, {k: row bytes}, {k: step})] of the held jobs with rows to save now."""
        if not self.enabled and not force and not self._urgent:
            return []
        out = []
        for h in held:
            if h.ending:
                continue
            rows, steps = {}, {}
            for k in sorted(h.todo):
                rid = h.rid(k)
                st = ex.state_of(rid)
                if st is None or st.done:
                    continue
                last, at = self._last.setdefault(rid, (0, now))
                moved = st.step - last
                if moved <= 0:
                    self._urgent.discard(rid)       # saved at this step already
                    continue
                if (force or rid in self._urgent or (self.every_steps and moved >= self.every_steps)
                        or (self.every_s and now - at >= self.every_s)):
                    rows[k] = self.pipe.save_row(st, self.meta(h.job_id, h.attempt, k)).to_bytes()
                    steps[k] = st.step
            if rows:
                out.append((h, rows, steps))
        return out

    def saved(self, h, steps: dict[int, int], now: float) -> None:
        for k, step in steps.items():
            self._last[h.rid(k)] = (step, now)
            self._urgent.discard(h.rid(k))

    def forget(self, h, k: int | None = None) -> None:
        """Drop the bookkeeping of one image (finished) or of the whole job (dropped, ended)."""
        ks = range(h.spec.n) if k is None else (k,)
        for i in ks:
            self._last.pop(h.rid(i), None)
            self._urgent.discard(h.rid(i))
        if k is None:
            self._spec.pop(h.job_id, None)
