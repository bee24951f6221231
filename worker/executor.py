"""BatchExecutor: runs what worker/scheduler.py decides, one continuous-batching iteration at a time.

Each `iterate()` (the scheduler decides, this runs; vLLM's
update_from_output):
  1. applies cancels (queued or running requests simply leave: their state is dropped),
  2. asks the pure scheduler which waiting requests to admit and which latent size steps,
  3. text-encodes all newly admitted requests together (`pipe.encode`: their distinct texts, one
     call on a GPU, one per text on the CPU where a batched call is not batch-invariant)
     and creates their states (`pipe.start`: initial latent from the request's own seed; or
     `pipe.resume` from a saved row state, model/row_state.py, with a Resumed event),
  4. runs ONE batched U-Net step over the chosen size group (`pipe.step`; 2 rows per request for
     classifier-free guidance, each row with its own timestep, guidance, sampler state),
  5. finishes the requests that reached their last step in ONE batched VAE decode + safety check
     (`pipe.finish`), and returns events: Progress / Finished / Failed.

Preemption (the scheduler's Decision.park): a parked request leaves the running set at the step
boundary with its RequestState kept in memory (latents, sampler history, RNG state, edit
tensors: model/row_state.py), waits like a queued one, and is admitted again later without
encoding or starting anew: it goes on from the same state, so its image is the one it would have
been alone (steps are batch-invariant on the CPU; DESIGN 19). Parked / Unparked events tell the
worker, which also saves the parked row to Redis (worker/checkpoint.py) so that the job resumes
on another worker if this one stops.

Compute accounting: every batched call's wall time is split over the requests in it (equal
shares: every request contributes the same number of rows to a call, e.g. 2 U-Net rows with CFG,
as all requests in one step share one latent size); a request's `compute_s` is the sum of its
shares of encode, start, every step and finish. A failed call is charged to nobody.

Isolation: if `pipe.step` raises for a batch, the batch is bisected and the halves are retried, so
only a request that fails ALONE is failed; its batch-mates step normally in the same iteration.
The engine promises (docs/CONTRACTS.md §1) that an exception inside `step` leaves the other
states as they were; states that the engine did advance before raising (state.step changed) are
not stepped again. `encode` and `finish` fall back to one call per request the same way.

Thread safety: `add` and `cancel` may be called from another thread than `iterate`.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from latentd.worker.scheduler import Item, Limits, schedule

log = logging.getLogger("latentd.worker")


@dataclass(frozen=True)
class Progress:
    request_id: str
    step: int
    total: int


@dataclass(frozen=True)
class Finished:
    request_id: str
    image: object               # model.pipeline.GeneratedImage
    compute_s: float


@dataclass(frozen=True)
class Preview:
    request_id: str
    step: int
    total: int
    rgb: object                 # uint8 (h', w', 3): model.preview.LatentRGB.render of the x0 estimate


@dataclass(frozen=True)
class Resumed:
    """Admitted from a saved row state (model/row_state.py) at `step` instead of step 0."""
    request_id: str
    step: int
    total: int


@dataclass(frozen=True)
class Parked:
    """Set aside at step `step` for higher-priority work; its state is kept."""
    request_id: str
    step: int
    total: int


@dataclass(frozen=True)
class Unparked:
    """Admitted again after `parked_s` seconds parked; it goes on from its kept state."""
    request_id: str
    step: int
    parked_s: float


@dataclass(frozen=True)
class Failed:
    request_id: str
    code: str                   # docs/CONTRACTS.md §2 error codes
    message: str


@dataclass(eq=False)
class _Entry:
    request_id: str
    key_name: str
    req: object                 # model.pipeline.GenerationRequest
    arrival: int
    size: tuple[int, int]       # latent (h, w)
    mem_mb: float
    last_tick: int              # see scheduler.Item.last_tick
    state: object = None        # model.pipeline.RequestState once admitted
    compute_s: float = 0.0
    resume: object = None       # model.row_state.RowState to start from (None: step 0)
    priority: int = 1           # 0 high, 1 normal, 2 low (scheduler.Item.priority)
    parked_at: float | None = None   # perf_counter when parked (its state is kept)
    queued: int = 0             # the iteration it was added (scheduler.Item.queued: aging)

    def item(self) -> Item:
        st = self.state
        return Item(self.request_id, self.key_name, self.arrival, self.size,
                    st.step if st is not None else (self.resume.step if self.resume is not None else 0),
                    st.total if st is not None else self.req.run_steps, self.mem_mb, self.last_tick,
                    self.priority, self.queued)


def error_code(exc: BaseException) -> str:
    from latentd.model.errors import InvalidRequest
    if isinstance(exc, InvalidRequest):
        return "invalid_request"
    if isinstance(exc, MemoryError) or "OutOfMemoryError" in type(exc).__name__:
        return "out_of_memory"
    return "engine_error"


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def estimate_mb(size: tuple[int, int], dtype_bytes: int = 4) -> float:
    """Rough device memory of one request in a U-Net call, MB, from its latent (h, w).

    Calibrated on SD 1.x: a 512x512 image (64x64 latent, 2 CFG rows) needs about 1.5 GB of
    activations in fp16 with memory-efficient attention; activations scale with latent cells and
    element size. Only used when a memory budget is set."""
    h, w = size
    return 1500.0 * (h * w) / (64 * 64) * dtype_bytes / 2


class BatchExecutor:
    def __init__(self, pipe, max_batch: int = 16, memory_budget_mb: float | None = None, *,
                 memory_estimate: Callable[[tuple[int, int]], float] | None = None,
                 band: float = Limits.band, max_skip: int = Limits.max_skip, preview=None,
                 priority_alone: bool = Limits.priority_alone):
        """band / max_skip: shortest-remaining-first within a size group (worker/scheduler.py);
        band=float("inf") steps every running request of the group in every call.
        preview: a model.preview.LatentRGB; watched requests (see watch()) then get Preview
        events from their x0 estimate."""
        self.preview = preview
        self._watch: dict[str, int] = {}        # request id -> preview every k steps (under _lock)
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.pipe = pipe
        self.limits = Limits(max_batch=max_batch, memory_budget_mb=memory_budget_mb, band=band,
                             max_skip=max_skip, priority_alone=priority_alone)
        self._estimate = memory_estimate or self._default_estimate
        self._lock = threading.Lock()
        self._incoming: list[_Entry] = []       # added since the last iteration (under _lock)
        self._cancels: set[str] = set()         # (under _lock)
        self._pending: list = []                # events produced outside iterate() (under _lock)
        self._waiting: dict[str, _Entry] = {}
        self._running: dict[str, _Entry] = {}
        self._arrival = itertools.count()
        self._tick = 0
        self.stats = {"unet_calls": 0, "images_finished": 0, "last_batch_size": 0,
                      "iterations": 0, "request_steps": 0, "failed": 0, "text_calls": 0,
                      "finish_calls": 0, "text_s": 0.0, "unet_s": 0.0, "finish_s": 0.0,
                      "preemptions": 0, "parked_s": 0.0}

    # --- the loop's side ---------------------------------------------------------------------
    def add(self, request_id: str, key_name: str, req, resume=None, priority: int = 1) -> None:
        """Queue a complete request (model.pipeline.GenerationRequest with its size and an edit's
        strength: the worker's come from a checked JobSpec, the engine's own from
        Pipeline.validate); it waits for admission. Nothing is resolved or validated here again.
        resume: a model.row_state.RowState saved mid-run of this request: admitted there
        (`pipe.resume`, a Resumed event) instead of at step 0; one that does not fit starts over.
        priority: 0 high, 1 normal, 2 low (admitted first; parks lower-priority running work)."""
        if req.width is None or req.height is None:
            raise ValueError("BatchExecutor.add takes a complete request (Pipeline.validate fills it)")
        size = self._latent_size(req)
        entry = _Entry(request_id, key_name, req, next(self._arrival), size,
                       self._estimate(size), self._tick, resume=resume, priority=int(priority),
                       queued=self._tick)
        with self._lock:
            self._cancels.discard(request_id)
            self._incoming.append(entry)

    def cancel(self, request_id: str) -> None:
        """The request leaves at the next iterate(), queued or running; no event is emitted."""
        with self._lock:
            self._cancels.add(request_id)

    def watch(self, request_id: str, every: int) -> None:
        """Emit a Preview of this request every `every` steps (0: stop), except at its last."""
        with self._lock:
            if every > 0 and self.preview is not None:
                self._watch[request_id] = int(every)
            else:
                self._watch.pop(request_id, None)

    def state_of(self, request_id: str):
        """The running request's model.pipeline.RequestState (None: waiting, done or unknown);
        read from the iterating thread (the worker saves row states between iterations)."""
        e = self._running.get(request_id) or self._waiting.get(request_id)   # (parked: kept)
        return None if e is None else e.state

    @property
    def parked_count(self) -> int:
        return sum(e.state is not None for e in list(self._waiting.values()))

    def claim_limit(self) -> int | None:
        """The worst priority a FULL executor should still take on (a request that would park
        running work at the next step), or None: nothing it runs can be parked, or a request
        that outranks its running work is already waiting. Read from the iterating thread."""
        if not self._running:
            return None
        worst = max(e.priority for e in self._running.values())
        with self._lock:
            waiting = [*self._waiting.values(), *self._incoming]
        if worst == 0 or any(w.priority < worst for w in waiting):
            return None
        return worst - 1

    def compute_of(self, request_id: str) -> float:
        """Compute charged so far to a request that has not finished (0.0: unknown or done); read
        from the iterating thread, before cancelling it, so a job stopped mid-run pays its share."""
        e = self._running.get(request_id) or self._waiting.get(request_id)
        return 0.0 if e is None else e.compute_s

    @property
    def waiting_count(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._incoming)

    @property
    def running_count(self) -> int:
        return len(self._running)

    @property
    def idle(self) -> bool:
        with self._lock:
            return not (self._waiting or self._running or self._incoming or self._pending)

    def iterate(self) -> list:
        self._tick += 1
        self.stats["iterations"] += 1
        with self._lock:
            events, self._pending = self._pending, []
            for e in self._incoming:
                self._waiting[e.request_id] = e
            self._incoming = []
            cancels, self._cancels = self._cancels, set()
            for rid in cancels:
                self._watch.pop(rid, None)
            watch = dict(self._watch)
        for rid in cancels:
            self._waiting.pop(rid, None)
            self._running.pop(rid, None)

        d = schedule([e.item() for e in self._running.values()],
                     [e.item() for e in self._waiting.values()], self.limits, now=self._tick)
        for rid, reason in d.reject:
            self._waiting.pop(rid)
            events.append(Failed(rid, "out_of_memory", reason))
        now = time.perf_counter()
        for rid in d.park:               # at the step boundary: the state stays as it is
            e = self._running.pop(rid)
            e.last_tick, e.parked_at = self._tick, now
            self._waiting[rid] = e
            self.stats["preemptions"] += 1
            events.append(Parked(rid, e.state.step, e.state.total))
        admitted = [self._waiting.pop(rid) for rid in d.admit]
        for e in admitted:
            if e.state is not None:      # a parked request: on from its kept state
                parked_s = now - (e.parked_at or now)
                self.stats["parked_s"] += parked_s
                e.parked_at, e.last_tick = None, self._tick - 1
                self._running[e.request_id] = e
                events.append(Unparked(e.request_id, e.state.step, parked_s))
        events += self._admit([e for e in admitted if e.state is None])

        group = [self._running[rid] for rid in d.run if rid in self._running]
        self.stats["last_batch_size"] = len(group)
        if group:
            stepped, failed = self._step(group)
            events += failed
            for e in stepped:
                e.last_tick = self._tick
                events.append(Progress(e.request_id, e.state.step, e.state.total))
                every = watch.get(e.request_id)
                if every and not e.state.done and e.state.step % every == 0:
                    events.append(self._preview(e))
            self.stats["request_steps"] += len(stepped)
            events += self._finish([e for e in stepped if e.state.done])
        self.stats["failed"] += sum(isinstance(ev, Failed) for ev in events)
        return events

    # --- running the engine ------------------------------------------------------------------
    def _admit(self, entries: list[_Entry]) -> list:
        """Encode the texts of all newly admitted requests together (`pipe.encode`), then their states."""
        if not entries:
            return []
        events = []
        ok, conds, failed = self._batched(entries, self.pipe.encode, "text")
        for e, exc in failed:
            events.append(Failed(e.request_id, error_code(exc), _message(exc)))
        started = []
        t0 = time.perf_counter()
        for e, cond in zip(ok, conds):
            try:
                e.state = self._start(e, cond, events)   # latent (1, 4, h, w) from e.req.seed
            except Exception as exc:
                events.append(Failed(e.request_id, error_code(exc), _message(exc)))
                continue
            e.last_tick = self._tick - 1    # not stepped yet: next in the rotation (scheduler.Item)
            self._running[e.request_id] = e
            started.append(e)
        share = (time.perf_counter() - t0) / max(len(started), 1)
        for e in started:                   # starts are tiny (one randn each): equal shares
            e.compute_s += share
        return events

    def _start(self, e: _Entry, cond, events: list):
        """The request's state: resumed from its saved row when it has one that fits, else new."""
        row, e.resume = e.resume, None
        if row is not None:
            try:
                state = self.pipe.resume(e.req, cond, row)
            except ValueError as exc:           # RowStateError: another request, model or plan
                log.warning("request %s: saved row not resumed, starting over: %s", e.request_id, exc)
            else:
                events.append(Resumed(e.request_id, state.step, state.total))
                return state
        return self.pipe.start(e.req, cond)

    def _step(self, entries: list[_Entry]) -> tuple[list[_Entry], list[Failed]]:
        """One U-Net call over `entries` (same latent size); on an exception, bisect so that only
        requests that fail alone are failed. Returns (stepped entries, Failed events)."""
        states = [e.state for e in entries]
        before = [s.step for s in states]
        t0 = time.perf_counter()
        self.stats["unet_calls"] += 1
        try:
            self.pipe.step(states)
        except Exception as exc:
            self.stats["unet_s"] += time.perf_counter() - t0
            advanced = [e for e, b in zip(entries, before) if e.state.step != b]
            rest = [e for e, b in zip(entries, before) if e.state.step == b]
            if len(rest) == 1 and not advanced:
                self._running.pop(rest[0].request_id, None)
                return [], [Failed(rest[0].request_id, error_code(exc), _message(exc))]
            stepped, failed = list(advanced), []
            half = (len(rest) + 1) // 2
            for part in (rest[:half], rest[half:]):
                if part:
                    s, f = self._step(part)
                    stepped += s
                    failed += f
            return stepped, failed
        dt = time.perf_counter() - t0
        self.stats["unet_s"] += dt
        for e in entries:
            e.compute_s += dt / len(entries)
        return entries, []

    def _preview(self, e: _Entry) -> Preview:
        """The coarse preview of the x0 estimate of e's last step (a linear map of at most
        PREVIEW_CELLS^2 cells: no decode); its time is charged to e."""
        t0 = time.perf_counter()
        x0 = e.state.x0_prev if e.state.x0_prev is not None else e.state.latent   # (1, C, h, w)
        rgb = self.preview.render(x0)
        e.compute_s += time.perf_counter() - t0
        return Preview(e.request_id, e.state.step, e.state.total, rgb)

    def _finish(self, entries: list[_Entry]) -> list:
        """One batched VAE decode + safety check for the requests that took their last step."""
        if not entries:
            return []
        with self._lock:
            for e in entries:
                self._watch.pop(e.request_id, None)
        for e in entries:
            self._running.pop(e.request_id, None)
        events = []
        ok, images, failed = self._batched(entries, self.pipe.finish, "finish",
                                           arg=lambda e: e.state)
        for e, exc in failed:
            events.append(Failed(e.request_id, error_code(exc), _message(exc)))
        for e, img in zip(ok, images):
            events.append(Finished(e.request_id, img, e.compute_s))
            e.state = None                      # free the latent now
        self.stats["images_finished"] += len(ok)
        return events

    def _batched(self, entries, fn, stat, arg=lambda e: e.req):
        """fn(list) -> list, batched; on an exception one call per entry. Charges equal shares.
        Returns (ok entries, their results, [(entry, exception)])."""
        t0 = time.perf_counter()
        self.stats[stat + "_calls"] += 1
        try:
            out = fn([arg(e) for e in entries])
        except Exception as exc:
            self.stats[stat + "_s"] += time.perf_counter() - t0
            if len(entries) == 1:
                return [], [], [(entries[0], exc)]
            ok, res, failed = [], [], []
            for e in entries:           # one at a time, so one bad request fails alone
                o, r, f = self._batched([e], fn, stat, arg)
                ok, res, failed = ok + o, res + r, failed + f
            return ok, res, failed
        dt = time.perf_counter() - t0
        self.stats[stat + "_s"] += dt
        share = dt / len(entries)
        for e in entries:
            e.compute_s += share
        return list(entries), list(out), []

    # --- helpers -----------------------------------------------------------------------------
    def _latent_size(self, req) -> tuple[int, int]:
        """Latent (h, w) of a complete request."""
        f = self.pipe.info.vae_factor
        return (req.height // f, req.width // f)

    def _default_estimate(self, size: tuple[int, int]) -> float:
        import torch
        dtype = getattr(self.pipe, "dtype", torch.float32)
        return estimate_mb(size, torch.empty((), dtype=dtype).element_size())
