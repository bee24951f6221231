"""Continuous-batching scheduler: decides, never runs (vLLM's schedule()).

Pure: no torch, no clocks, no I/O. The executor (worker/executor.py) describes the running set
and the waiting list as plain `Item`s and gets back a `Decision`; everything here is a function
of its arguments, so it is unit-tested without a model (tests/test_scheduler.py).

Policy (one call to `schedule` per worker iteration):

0. Priority (Item.priority: 0 high, 1 normal, 2 low) comes before everything below: admission
   takes the best priority first (fairness and FCFS order requests of equal priority), and when
   the running set is full a waiting request PARKS the running request of the worst priority
   below its own (latest arrival first; Decision.park): the executor keeps that request's state
   and admits it again later, where it stopped (DESIGN 19). Starvation bound: a request queued
   more than `Limits.priority_age` iterations ago (Item.queued) counts as the best priority
   present, so it is admitted at the next free slot and never parked again, however much high
   work keeps coming.
   With `Limits.priority_alone` a size group that holds a higher-priority request steps that
   priority alone (lower ones sit out, bounded by `max_skip` as in 3.): on a CPU a call's cost
   grows with its rows, so a high request runs at its latency alone rather than at a full batch's.

1. Admission (waiting -> running), bounded by `Limits.max_batch` (size of the running set, over
   all latent sizes) and `Limits.memory_budget_mb` (sum of the items' estimates).
   Fair across API keys by max-min fair share of running slots: the next request admitted is the
   oldest waiting request of the key that currently holds the FEWEST running slots (counting the
   ones admitted in this same decision); ties go to the oldest request (first come, first served).
   So a key that floods the queue gets slots only as fast as every other key with work waiting,
   and with a single key this is plain FCFS. Within a key, strictly FCFS.
   Memory: if the chosen request does not fit in the memory left, admission STOPS for this
   iteration (no skipping ahead to smaller requests), so a large request cannot be starved by a
   stream of small ones; it gets in as soon as enough running work finishes. A request whose
   estimate alone exceeds the whole budget can never run and is rejected.
2. Which size group runs: one U-Net call only takes latents of one (h, w). Groups take turns:
   the group that last ran LONGEST ago runs (round-robin; "last ran" = the newest `last_tick` of
   its started members), so no group waits more than (number of groups) iterations. Newly
   admitted requests are candidates in the same decision: a new request of a running size steps
   in the iteration that admits it; a group made only of new requests joins the BACK of the
   rotation (its time in the queue bought admission, not precedence over running groups).
   Ties: a group with started requests before one of only new ones, then more work per call,
   then the oldest arrival.
3. Who in the group steps (short requests first, with aging): a request steps if its remaining
   steps are within `band * r_min + band_slack` of the group's fewest remaining steps `r_min`,
   or if it has not stepped for more than `max_skip` iterations. Equal requests (the common case,
   and a closed loop of clients) always step together; but a 10-step request that arrives while
   50-step requests run steps ALONE until it is done (or until the long ones have waited
   `max_skip` iterations), so on hardware where a bigger batch costs more per call (a CPU) its
   latency stays close to its latency alone (head-of-line blocking). This is shortest-
   remaining-first by bands (SRPT minimises mean latency); the aging bound keeps it starvation-
   free: under any load a running request steps at least once every `max_skip + groups`
   iterations. With `band=inf` every request of the group steps every time it runs.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Item:
    """One request as the scheduler sees it (running or waiting)."""
    request_id: str
    key: str                    # API key NAME (fairness unit), never the key itself
    arrival: int                # global arrival order (smaller = earlier)
    size: tuple[int, int]       # latent (h, w); only equal sizes share a U-Net call
    step: int = 0               # steps done
    total: int = 1              # steps in all
    mem_mb: float = 0.0         # estimated device memory while running
    last_tick: int = 0          # waiting: iteration it was queued (or parked); running: iteration
                                # it last stepped, or the one before its admission if it has not yet
    priority: int = 1           # 0 high, 1 normal, 2 low (jobs/request.py PRIORITIES' index)
    queued: int | None = None   # iteration it first queued, for aging (None: last_tick)


@dataclass(frozen=True)
class Limits:
    max_batch: int = 16                   # most requests in the running set (all sizes)
    memory_budget_mb: float | None = None  # None: no memory limit
    band: float = 2.0                     # step together: remaining <= band * r_min + band_slack
    band_slack: int = 4
    max_skip: int = 16                    # skipped this many iterations -> steps regardless
    priority_age: int = 200               # waited this many iterations -> counts as high (0: never)
    priority_alone: bool = True           # a group's best priority steps without the lower ones


@dataclass(frozen=True)
class Decision:
    admit: tuple[str, ...] = ()                   # waiting ids to move to running, in this order
    reject: tuple[tuple[str, str], ...] = ()      # (id, reason): can never be admitted
    group: tuple[int, int] | None = None          # latent size that steps this iteration
    run: tuple[str, ...] = ()                     # ids that step (running + admitted, that size)
    park: tuple[str, ...] = ()                    # running ids to set aside (state kept) for
                                                  # higher-priority waiting requests


def schedule(running: list[Item], waiting: list[Item], limits: Limits,
             now: int | None = None) -> Decision:
    """`now`: this iteration's tick (default: one past the newest last_tick)."""
    tick = now if now is not None else max((c.last_tick for c in [*running, *waiting]), default=0) + 1
    admit, reject, park = _admit(running, waiting, limits, tick)
    parked = set(park)
    running = [r for r in running if r.request_id not in parked]
    by_id = {w.request_id: w for w in waiting}
    # A newly admitted request counts as having waited no longer than the most recently stepped
    # running group (see 2. above).
    latest = max((r.last_tick for r in running), default=None)
    candidates = list(running) + [
        by_id[i] if latest is None else replace(by_id[i], last_tick=max(by_id[i].last_tick, latest))
        for i in admit]
    if now is None:
        now = max((c.last_tick for c in candidates), default=0) + 1
    groups: dict[tuple[int, int], list[Item]] = defaultdict(list)
    for c in candidates:
        groups[c.size].append(c)
    if not groups:
        return Decision(admit=tuple(admit), reject=tuple(reject), park=tuple(park))
    eligible = {size: _eligible(members, limits, now) for size, members in groups.items()}
    group = min(groups, key=lambda s: (_group_priority(groups[s], limits, now),
                                      _last_ran(groups[s]),
                                      all(c.step == 0 for c in groups[s]),
                                      -len(eligible[s]),
                                      min(c.arrival for c in groups[s])))
    run = tuple(c.request_id for c in sorted(eligible[group], key=lambda c: c.arrival))
    return Decision(admit=tuple(admit), reject=tuple(reject), group=group, run=run, park=tuple(park))


def rank(item: Item, limits: Limits, now: int, floor: int = 0) -> int:
    """Item's priority, or `floor` (the best priority present) once it has waited longer than
    limits.priority_age: aging lifts a request to the best priority there is, never above the
    requests of its own priority (so it does not reorder work of one priority)."""
    since = item.last_tick if item.queued is None else item.queued
    if limits.priority_age and now - since > limits.priority_age:
        return min(floor, item.priority)
    return item.priority


def _group_priority(members: list[Item], limits: Limits, now: int) -> int:
    """A group with higher-priority work runs first, unless that would keep the others waiting
    past max_skip (then it takes its round-robin turn)."""
    if not limits.priority_alone or now - _last_ran(members) > limits.max_skip:
        return 0
    return min(c.priority for c in members)


def _last_ran(members: list[Item]) -> int:
    """When this group last ran: the newest last_tick of its started members (new members
    carry their admission tick, which must not push an existing group back in the rotation)."""
    started = [c.last_tick for c in members if c.step > 0]
    return max(started) if started else max(c.last_tick for c in members)


def _eligible(members: list[Item], limits: Limits, now: int) -> list[Item]:
    """Members that step if this group runs: the shortest remaining band (of the group's best
    priority, with priority_alone), plus the aged."""
    best = min(c.priority for c in members) if limits.priority_alone else None
    top = [c for c in members if best is None or c.priority == best]
    r_min = min(c.total - c.step for c in top)
    cut = limits.band * r_min + limits.band_slack
    return [c for c in members
            if (c in top and c.total - c.step <= cut) or now - c.last_tick > limits.max_skip]


def _admit(running: list[Item], waiting: list[Item], limits: Limits, now: int):
    budget = limits.memory_budget_mb
    slots = limits.max_batch - len(running)
    mem_free = None if budget is None else budget - sum(r.mem_mb for r in running)
    held: dict[str, int] = defaultdict(int)          # running slots per key
    for r in running:
        held[r.key] += 1
    floor = min((c.priority for c in [*running, *waiting]), default=0)

    def rk(item: Item) -> int:
        return rank(item, limits, now, floor)

    queues: dict[str, list[Item]] = defaultdict(list)  # per key, next last (pop() is O(1))
    for w in sorted(waiting, key=lambda w: (rk(w), w.arrival), reverse=True):
        queues[w.key].append(w)
    # who a waiting request of a better priority may park: the worst rank, the latest arrival
    # first (an aged request is never parked; an aged waiting one is admitted first, parks nobody)
    parkable = sorted(running, key=lambda r: (rk(r), r.arrival))

    admit: list[str] = []
    reject: list[tuple[str, str]] = []
    park: list[str] = []
    while queues:
        key = min(queues, key=lambda k: (rk(queues[k][-1]), held[k], queues[k][-1].arrival))
        head = queues[key][-1]
        if budget is not None and head.mem_mb > budget:
            reject.append((head.request_id, f"needs about {head.mem_mb:.0f} MB, more than the "
                                            f"worker's memory budget of {budget:.0f} MB"))
        elif slots <= 0 or (mem_free is not None and head.mem_mb > mem_free):
            if parkable and rk(parkable[-1]) > head.priority:
                victim = parkable.pop()
                park.append(victim.request_id)
                held[victim.key] -= 1
                slots += 1
                if mem_free is not None:
                    mem_free += victim.mem_mb
                continue
            break   # full: stop rather than skip ahead (no starvation of the head)
        else:
            admit.append(head.request_id)
            held[key] += 1
            slots -= 1
            if mem_free is not None:
                mem_free -= head.mem_mb
        queues[key].pop()
        if not queues[key]:
            del queues[key]
    return admit, reject, park
