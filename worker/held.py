"""The jobs a worker has claimed: one `Held` per job, in a `HeldJobs` map.

A job of n images runs as n executor requests; each request id names the job, the image index
and the claim attempt (`Held.rid`, `parse_rid`), so an event of an attempt that is no longer ours
is recognised and ignored.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from latentd.jobs.spec import JobSpec


@dataclass
class Held:
    """A job this worker has claimed (fenced by `attempt`)."""
    job_id: str
    attempt: int
    spec: JobSpec
    claimed_at: float
    deadline: float                        # monotonic
    todo: set[int] = field(default_factory=set)
    progress: dict[int, int] = field(default_factory=dict)
    dirty: bool = False
    ending: bool = False                   # a terminal write is queued; ignore further events
    watch: int | None = None               # someone listens: preview every k steps (0: none)
    base_steps: int = 0                    # steps of images done by an earlier attempt
    sent_step: int = -1                    # progress last published to the event stream
    resumed_from: int | None = None        # a re-run: the progress step it went on from (saved rows)
    parked: dict[int, float] = field(default_factory=dict)   # image -> monotonic time it was parked
    priority: int = 1                      # 0 high, 1 normal, 2 low
    due_at: float | None = None            # unix s: created_at + the spec's deadline_s (None: none)

    def steps_done(self) -> int:
        return self.base_steps + sum(min(p, self.spec.run_steps) for p in self.progress.values())

    def rid(self, k: int) -> str:
        return f"{self.job_id}.{k}.{self.attempt}"


def parse_rid(rid: str) -> tuple[str, int, int]:
    """(job id, image index, attempt) of an executor request id made by `Held.rid`."""
    job_id, k, attempt = rid.split(".")
    return job_id, int(k), int(attempt)


class HeldJobs:
    """The held jobs by id. Only the main loop changes the map; the heartbeat thread reads
    `snapshot()` to renew their leases, so changes and snapshots take the lock."""

    def __init__(self):
        self._jobs: dict[str, Held] = {}
        self._lock = threading.Lock()

    def snapshot(self) -> list[tuple[str, int]]:
        """(job id, attempt) of every held job; safe from any thread."""
        with self._lock:
            return [(h.job_id, h.attempt) for h in self._jobs.values()]

    def add(self, h: Held) -> None:
        with self._lock:
            self._jobs[h.job_id] = h

    def pop(self, job_id: str) -> Held | None:
        with self._lock:
            return self._jobs.pop(job_id, None)

    def get(self, job_id: str) -> Held | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Held]:
        """A copy: callers drop jobs while they go through it."""
        return list(self._jobs.values())

    def ids(self) -> list[str]:
        return list(self._jobs)

    def __len__(self) -> int:
        return len(self._jobs)
