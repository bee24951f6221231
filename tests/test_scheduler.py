"""Pure unit tests of worker/scheduler.py: admission (limits, FCFS, fairness between keys) and
which size group steps. No model, no torch: a tiny simulator below plays the executor's part."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from latentd.worker.scheduler import Item, Limits, schedule

A, B = "alice", "bob"
S64, S32 = (8, 8), (4, 4)


def items(key, n, start=0, size=S64, total=3, mem=0.0):
    return [Item(f"{key}{i}", key, start + i, size, 0, total, mem, last_tick=start + i)
            for i in range(n)]


def simulate(waiting, limits, arrivals=None, max_iters=10_000):
    """Play the executor: admit, step the chosen group, drop finished. `arrivals` maps an
    iteration to Items joining the waiting list then. Returns (admission order, finish
    iteration per id, per-iteration decisions)."""
    waiting, running = list(waiting), []
    admitted, finished, decisions = [], {}, []
    arrivals = arrivals or {}
    for tick in range(1, max_iters):
        waiting += arrivals.get(tick, [])
        if not waiting and not running and tick > max(arrivals, default=0):
            break
        d = schedule(running, waiting, limits, now=tick)
        decisions.append(d)
        assert not d.reject
        by_id = {w.request_id: w for w in waiting}
        running += [replace(by_id[i], last_tick=tick - 1) for i in d.admit]
        waiting = [w for w in waiting if w.request_id not in d.admit]
        admitted += d.admit
        assert len(running) <= limits.max_batch
        if limits.memory_budget_mb is not None:
            assert sum(r.mem_mb for r in running) <= limits.memory_budget_mb
        nxt = []
        for r in running:
            if r.request_id in d.run:
                assert r.size == d.group
                r = replace(r, step=r.step + 1, last_tick=tick)
                if r.step == r.total:
                    finished[r.request_id] = tick
                    continue
            nxt.append(r)
        running = nxt
    return admitted, finished, decisions


def test_single_key_is_first_come_first_served_up_to_max_batch():
    waiting = items(A, 6)[::-1]                     # order of the list must not matter
    d = schedule([], waiting, Limits(max_batch=4))
    assert d.admit == ("alice0", "alice1", "alice2", "alice3")
    assert d.group == S64 and d.run == d.admit      # admitted requests step right away
    running = [replace(w, step=1) for w in items(A, 4)]
    assert schedule(running, items(A, 2, start=4), Limits(max_batch=4)).admit == ()


def test_admission_alternates_between_keys():
    # Alice floods 20 requests before Bob's 3 arrive: admission still interleaves them.
    waiting = items(A, 20) + items(B, 3, start=20)
    d = schedule([], waiting, Limits(max_batch=4))
    assert d.admit == ("alice0", "bob0", "alice1", "bob1")


def test_key_holding_fewer_running_slots_goes_first_even_if_younger():
    running = [replace(i, step=1) for i in items(A, 3)]
    waiting = items(A, 5, start=3) + items(B, 1, start=50)
    d = schedule(running, waiting, Limits(max_batch=4))
    assert d.admit == ("bob0",)


def test_flood_from_one_key_does_not_starve_another():
    # Alice's 40 requests are queued first; Bob's 4 arrive at iteration 5. With FCFS Bob would
    # wait for all of Alice's; with fair admission he takes every other free slot.
    limits = Limits(max_batch=4)
    late_bob = {5: [replace(i, arrival=100 + k, last_tick=5) for k, i in enumerate(items(B, 4))]}
    admitted, finished, _ = simulate(items(A, 40, total=3), limits, arrivals=late_bob)
    assert len(finished) == 44
    bob_pos = [admitted.index(f"bob{k}") for k in range(4)]
    assert max(bob_pos) < 16, admitted          # FCFS would put Bob at positions 40..43
    assert max(finished[f"bob{k}"] for k in range(4)) < 20
    assert max(finished.values()) > 30          # Alice's backlog is still running well after


def test_fairness_is_first_come_first_served_between_equal_keys():
    waiting = items(B, 2, start=10) + items(A, 2, start=0)
    d = schedule([], waiting, Limits(max_batch=1))
    assert d.admit == ("alice0",)


def test_memory_budget_blocks_without_skipping_and_rejects_impossible():
    running = [replace(i, step=1) for i in items(A, 2, mem=300.0)]
    waiting = [Item("big", B, 5, S64, 0, 3, 500.0, 5), Item("small", B, 6, S64, 0, 3, 10.0, 6)]
    d = schedule(running, waiting, Limits(max_batch=16, memory_budget_mb=1000.0))
    assert d.admit == ()                       # big does not fit (600 + 500); small may not pass it
    d = schedule(running[:1], waiting, Limits(max_batch=16, memory_budget_mb=1000.0))
    assert d.admit == ("big", "small")
    huge = [Item("huge", B, 1, S64, 0, 3, 5000.0, 1)] + waiting
    d = schedule([], huge, Limits(max_batch=16, memory_budget_mb=1000.0))
    assert [r[0] for r in d.reject] == ["huge"] and "1000 MB" in d.reject[0][1]
    assert d.admit == ("big", "small")


def test_group_that_waited_longest_runs_and_groups_rotate():
    running = ([Item(f"a{i}", A, i, S64, 1, 9, 0, last_tick=7) for i in range(3)]
               + [Item("b0", B, 9, S32, 1, 9, 0, last_tick=6)])
    d = schedule(running, [], Limits())
    assert d.group == S32 and d.run == ("b0",)
    running[3] = replace(running[3], last_tick=8)
    d = schedule(running, [], Limits())
    assert d.group == S64 and d.run == ("a0", "a1", "a2")


def test_tie_goes_to_the_bigger_group():
    running = ([Item(f"a{i}", A, 5 + i, S64, 1, 9, 0, last_tick=3) for i in range(3)]
               + [Item("b0", B, 0, S32, 1, 9, 0, last_tick=3)])
    assert schedule(running, [], Limits()).group == S64


def test_new_request_joins_its_size_group_at_once_or_the_back_of_the_rotation():
    running = [Item(f"a{i}", A, i, S64, 4, 12, 0, last_tick=10) for i in range(8)]
    same = [Item("new", B, 20, S64, 0, 10, 0, last_tick=3)]
    d = schedule(running, same, Limits())
    assert d.admit == ("new",) and d.group == S64 and "new" in d.run and len(d.run) == 9
    # Another size: queued long ago (tick 3), yet it does not jump the running group's turn ...
    other = [Item("new", B, 20, S32, 0, 10, 0, last_tick=3)]
    running += [Item("b0", B, 9, (8, 4), 1, 9, 0, last_tick=9)]
    d = schedule(running, other, Limits())
    assert d.admit == ("new",) and d.group == (8, 4)
    # ... and runs right after it (it ties with the group that ran last, started groups first).
    running = [replace(r, last_tick=11 if r.size == (8, 4) else r.last_tick) for r in running]
    d = schedule(running + [replace(other[0], last_tick=10)], [], Limits())
    assert d.group == S64
    d = schedule([replace(r, last_tick=12) if r.size == S64 else r for r in running]
                 + [replace(other[0], last_tick=10)], [], Limits())
    assert d.group == S32 and d.run == ("new",)


def test_short_request_steps_alone_among_long_ones_until_they_age():
    longs = [Item(f"l{i}", A, i, S64, 4, 50, 0, last_tick=10) for i in range(8)]
    short = [Item("short", B, 20, S64, 0, 10, 0, last_tick=10)]
    d = schedule(longs, short, Limits(), now=11)
    assert d.run == ("short",)                          # 10 <= 2 * 10 + 4 < 46
    short = [replace(short[0], step=3, last_tick=13)]
    assert schedule(longs + short, [], Limits(), now=14).run == ("short",)
    # Aging: the long ones have not stepped for more than max_skip iterations -> all step.
    assert len(schedule(longs + short, [], Limits(max_skip=16), now=27).run) == 9
    # band=inf: plain continuous batching, everyone in the group steps every time.
    assert len(schedule(longs + short, [], Limits(band=float("inf")), now=14).run) == 9


def test_requests_a_few_steps_apart_step_together():
    running = [Item(f"r{i}", A, i, S64, s, 20, 0, last_tick=5) for i, s in enumerate((0, 3, 8))]
    assert schedule(running, [], Limits(), now=6).run == ("r0", "r1", "r2")   # 20, 17, 12 left


def test_head_of_line_short_request_finishes_in_its_own_steps():
    # Eight 50-step requests run; a 10-step request arrives at iteration 4. It finishes 10
    # iterations later (as if alone); the long ones all finish, none skipped > max_skip.
    limits = Limits(max_skip=16)
    late = {4: [Item("short", B, 100, S64, 0, 10, 0, last_tick=4)]}
    _, finished, decisions = simulate(items(A, 8, total=50), limits, arrivals=late)
    assert finished["short"] == 4 + 10 - 1
    assert len(finished) == 9
    assert max(finished.values()) == 50 + 10
    # With plain continuous batching (band=inf) it would share every call with the long ones.
    _, _, plain = simulate(items(A, 8, total=50), Limits(band=float("inf")), arrivals=late)
    assert all(len(d.run) == 9 for d in plain[3:13])


@pytest.mark.parametrize("band, bound", [(float("inf"), 3), (2.0, 16 + 3)])
def test_mixed_sizes_no_starvation(band, bound):
    rng = random.Random(0)
    waiting = [Item(f"r{i}", rng.choice([A, B, "carol"]), i, rng.choice([S64, S32, (8, 4)]),
                    0, rng.randint(1, 30), rng.uniform(10, 200), last_tick=0) for i in range(60)]
    limits = Limits(max_batch=6, memory_budget_mb=600.0, band=band, max_skip=16)
    _, finished, decisions = simulate(waiting, limits)
    assert len(finished) == 60
    # Every iteration steps someone while work is left (work conserving).
    assert all(d.run for d in decisions)
    # A running request never waits more than `bound` iterations between steps (or between its
    # admission and its first step): number of sizes, plus max_skip with short-first bands.
    last: dict[str, int] = {}
    worst = 0
    for t, d in enumerate(decisions):
        for i in d.admit:
            last[i] = t
        for i in d.run:
            worst = max(worst, t - last[i])
            last[i] = t
    assert worst <= bound
    if band == float("inf"):
        return
    # ... and short-first bands did make some request wait (else this test shows nothing).
    assert worst > 3


def test_empty():
    d = schedule([], [], Limits())
    assert d.admit == () and d.group is None and d.run == ()
