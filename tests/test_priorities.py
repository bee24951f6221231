"""Request priorities: the pure scheduler's order, parking and starvation bound; the claim
order in Redis (jobs/state.py CLAIM) with its starvation bound and queue positions; the per-key
cap; and end to end on a real redis-server and a real worker: a high job preempts a full batch
of low ones at a step boundary, and every parked image equals its run alone, bit for bit.
Polls with deadlines, never sleeps."""
from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from latentd.jobs import keys
from latentd.jobs.spec import JobSpec
from latentd.jobs.state import PASSED_OVER_MAX
from latentd.worker.scheduler import Item, Limits, schedule

HIGH, NORMAL, LOW = 0, 1, 2
S = (8, 8)


def it(rid, prio, arrival, key="k", step=0, total=50, last_tick=None):
    last_tick = arrival if last_tick is None else last_tick
    return Item(rid, key, arrival, S, step, total, 0.0, last_tick, prio, queued=last_tick)


# --- the pure scheduler --------------------------------------------------------------------------

def test_free_slots_go_by_priority_then_fairness():
    waiting = [it("low0", LOW, 0), it("norm0", NORMAL, 1, key="b"), it("high0", HIGH, 2),
               it("high1", HIGH, 3), it("high2", HIGH, 4, key="b")]
    d = schedule([], waiting, Limits(max_batch=3), now=5)
    # high first, fair across keys within high (b holds fewer slots than k after high0)
    assert d.admit == ("high0", "high2", "high1")
    assert d.park == ()


def test_a_full_batch_parks_its_worst_priority_for_a_waiting_high():
    running = [it("lowA", LOW, 0, step=5, last_tick=9), it("lowB", LOW, 1, step=5, last_tick=9),
               it("norm", NORMAL, 2, step=5, last_tick=9)]
    d = schedule(running, [it("high", HIGH, 3, total=10, last_tick=9)], Limits(max_batch=3), now=10)
    assert d.park == ("lowB",)                      # the worst priority, the latest arrival
    assert d.admit == ("high",)
    assert d.run == ("high",)                       # priority_alone: high steps by itself
    d = schedule(running, [it("high", HIGH, 3, total=10, last_tick=9)],
                 Limits(max_batch=3, priority_alone=False, band=float("inf")), now=10)
    assert d.park == ("lowB",) and set(d.run) == {"lowA", "norm", "high"}
    # equal priorities never park each other
    d = schedule(running, [it("low2", LOW, 4, last_tick=9)], Limits(max_batch=3), now=10)
    assert d.park == () and d.admit == ()


def play(limits, waiting, arrivals, ticks=400, until=None):
    """Play the executor over ticks: park, admit, step the chosen ids, drop the finished.
    Returns ({id: finish tick}, {id: admission ticks}, parked ids)."""
    running, done, admitted, parked = [], {}, {}, set()
    for tick in range(1, ticks):
        waiting += arrivals.get(tick, [])
        d = schedule(running, waiting, limits, now=tick)
        parked |= set(d.park)
        by_id = {w.request_id: w for w in waiting}
        moved = [replace(r, last_tick=tick) for r in running if r.request_id in d.park]
        running = [r for r in running if r.request_id not in d.park]
        running += [replace(by_id[i], last_tick=tick - 1) for i in d.admit]
        waiting = [w for w in waiting if w.request_id not in d.admit] + moved
        for i in d.admit:
            admitted.setdefault(i, []).append(tick)
        nxt = []
        for r in running:
            if r.request_id in d.run:
                r = replace(r, step=r.step + 1, last_tick=tick)
                if r.step == r.total:
                    done[r.request_id] = tick
                    continue
            nxt.append(r)
        running = nxt
        if until is not None and until <= set(done):
            break
    return done, admitted, parked


def test_parked_work_comes_back_when_the_high_work_is_done():
    """Two slots running 50-step lows; a 10-step high arrives at tick 5."""
    done, _, parked = play(Limits(max_batch=2), [it("low0", LOW, 0), it("low1", LOW, 1)],
                           {5: [it("high", HIGH, 2, total=10, last_tick=5)]},
                           until={"low0", "low1", "high"})
    assert parked == {"low1"}
    assert done["high"] == 5 + 10 - 1                # admitted at once, stepped every tick
    assert done["high"] < min(done["low0"], done["low1"])
    assert set(done) == {"low0", "low1", "high"}


def test_a_low_request_is_admitted_despite_a_steady_stream_of_high_ones():
    """Starvation bound: one slot, a new 3-step high request every tick; the low one waiting
    since tick 0 is admitted once it has waited priority_age ticks, and never parked then."""
    arrivals = {t: [it(f"h{t}", HIGH, t, total=3, last_tick=t)] for t in range(1, 300)}
    done, admitted, parked = play(Limits(max_batch=1, priority_age=20),
                                  [it("low", LOW, 0, total=3, last_tick=0)], arrivals,
                                  until={"low"})
    assert "low" not in parked and len(admitted["low"]) == 1
    assert 20 < admitted["low"][0] <= 20 + 3 + 1, admitted["low"]
    assert done["low"] == admitted["low"][0] + 2
    # without aging it would wait for ever
    _, admitted, _ = play(Limits(max_batch=1, priority_age=0), [it("low", LOW, 0, total=3)],
                          arrivals, ticks=200)
    assert "low" not in admitted


# --- the claim order in Redis -------------------------------------------------------------------

def _client(redis_server):
    from latentd.config.settings import Settings
    from latentd.jobs.client import JobClient

    return JobClient(redis_server.client(), Settings(redis_url=redis_server.url, queue_name="q"))


def test_claims_take_high_then_normal_then_low_fairly_within_each(redis_server):
    from latentd.jobs.jobstore import JobStore

    c, sc = _client(redis_server), JobStore(redis_server.client(), "q", 60)
    sub = lambda owner, prio: c.submit(JobSpec(prompt="x", owner=owner, priority=prio))  # noqa: E731
    low = [sub("a", "low"), sub("b", "low")]
    norm = [sub("a", "normal")]
    high = [sub("a", "high"), sub("a", "high"), sub("b", "high")]
    # positions: every higher priority first, then the arrival order within its own
    assert [c.get(j, o)["queue_position"] for j, o in
            [(high[0], "a"), (high[2], "b"), (norm[0], "a"), (low[0], "a"), (low[1], "b")]] == [0, 2, 3, 4, 5]
    assert c.queue_depth() == 6
    assert sc.claim("w", 60, lowest="high").job_id == high[0]
    assert sc.claim("w", 60).job_id == high[2]              # fair across owners within high
    assert sc.claim("w", 60).job_id == high[1]
    assert sc.claim("w", 60, lowest="high") is None          # a full worker takes only what outranks
    assert sc.claim("w", 60).job_id == norm[0]
    assert c.get(low[1], "b")["queue_position"] == 1
    assert [sc.claim("w", 60).job_id for _ in range(2)] == low
    assert sc.claim("w", 60) is None and c.queue_depth() == 0


def test_low_is_claimed_after_at_most_the_bound_of_higher_claims(redis_server):
    from latentd.jobs.jobstore import JobStore

    c, sc = _client(redis_server), JobStore(redis_server.client(), "q", 60)
    low = c.submit(JobSpec(prompt="x", owner="a", priority="low"))
    for _ in range(3 * PASSED_OVER_MAX):
        c.submit(JobSpec(prompt="x", owner="b", priority="high"))
    order = [sc.claim("w", 60).job_id for _ in range(PASSED_OVER_MAX + 1)]
    assert order.index(low) == PASSED_OVER_MAX               # after exactly the bound
    # a canceled low job is gone from every list (and its counter does not fire on nothing)
    low2 = c.submit(JobSpec(prompt="x", owner="a", priority="low"))
    c.cancel(low2, "a")
    r = redis_server.client()
    assert r.llen(keys.queued_prio("q", "low")) == 0 and r.llen(keys.owners_of("q", "low")) == 0


# --- the per-key cap ----------------------------------------------------------------------------

def test_a_key_cap_refuses_a_higher_priority_with_403_naming_it(tmp_path):
    from latentd.app import auth
    from latentd.app.admission import check_priority
    from latentd.app.errors import ApiError
    from latentd.cli import main

    path = tmp_path / "keys.json"
    assert main(["keys", "create", "batch", "--file", str(path), "--max-priority", "low"]) == 0
    assert main(["keys", "create", "anyone", "--file", str(path)]) == 0
    assert json.loads(path.read_text())["batch"]["max_priority"] == "low"
    store = auth.KeyStore(auth.read_keys_file(str(path)), auth.read_permissions(str(path)),
                          auth.read_max_priority(str(path)))
    state = SimpleNamespace(keys=store)
    check_priority(state, "batch", "low")
    check_priority(state, "anyone", "high")             # default cap: high
    with pytest.raises(ApiError) as e:
        check_priority(state, "batch", "normal")
    assert e.value.status == 403 and "priority" in str(e.value.detail if hasattr(e.value, "detail")
                                                         else e.value)
    check_priority(SimpleNamespace(keys=None), "anonymous", "high")     # auth off: no cap
    path.write_text(json.dumps({"x": {"sha256": "0" * 64, "max_priority": "urgent"}}))
    with pytest.raises(ValueError, match="max_priority"):
        auth.read_max_priority(str(path))


def test_an_unknown_priority_is_refused_naming_the_allowed_values():
    from latentd.jobs.request_resolve import resolve
    from latentd.model.errors import InvalidRequest

    info = SimpleNamespace(name="m", native_width=64, native_height=64, quality_steps={"low": 2,
                           "medium": 4, "high": 8}, default_guidance=7.5, default_sampler="euler",
                           default_karras=False)
    with pytest.raises(InvalidRequest) as e:
        resolve(info, prompt="a", priority="urgent")
    assert e.value.field == "priority" and list(e.value.allowed) == ["high", "normal", "low"]


# --- end to end: preemption at a step boundary ----------------------------------------------------

def test_a_high_job_preempts_a_full_batch_of_low_ones_and_every_image_is_its_solo_run(stack):
    from devkit.services import free_port, poll, scrape

    w = stack.start(worker_max_batch=2, progress_interval_s=0, checkpoint_every_steps=1000,
                    checkpoint_every_s=0, worker_metrics_port=free_port())
    c, r = stack.client(), stack.redis.client()
    lows = [JobSpec(prompt=f"a low {i}", owner="o", steps=50, seed=10 + i, priority="low")
            for i in range(3)]
    high = JobSpec(prompt="a high one", owner="o", steps=10, seed=99, priority="high")
    low_ids = [c.submit(s) for s in lows]
    p = lambda j: int(stack.record(j).get("p:0", 0) or 0)  # noqa: E731
    poll(lambda: p(low_ids[0]) >= 3 and p(low_ids[1]) >= 3, 90.0, every=0,
         name="the batch full of running lows")
    assert stack.record(low_ids[2])["status"] == "queued"          # a third low waits in Redis
    before = {j: p(j) for j in low_ids[:2]}
    hid = c.submit(high)
    poll(lambda: p(hid) >= 1, 60, every=0, name="the high job stepped")
    after = {j: p(j) for j in low_ids[:2]}
    # it started within one step of arriving (a tick of claiming, then the next step boundary)
    assert all(after[j] - before[j] <= 2 for j in after), (before, after)
    parked = poll(lambda: next((j for j in low_ids[:2] if c.get(j, "o")["progress"]["parked"]
                                and r.exists(keys.checkpoint(j))), None), 30, every=0,
                  name="a low job shown parked, its row saved to Redis")
    assert c.wait(hid, "o", 60)["status"] == "succeeded", w.output()
    ends = {j: c.wait(j, "o", 120) for j in low_ids}
    assert all(d["status"] == "succeeded" for d in ends.values()), w.output()
    assert not ends[parked]["progress"]["parked"]
    done_high = float(stack.record(hid)["finished_at"])
    assert all(done_high < float(stack.record(j)["finished_at"]) for j in low_ids[:2])
    assert "parked at step" in w.output()
    got = {j: c.image_bytes(j, 0, "o") for j in [*low_ids, hid]}
    # each spec again, alone on the worker: the same bytes
    for jid, spec in zip([*low_ids, hid], [*lows, high]):
        solo = c.submit(spec)
        assert c.wait(solo, "o", 120)["status"] == "succeeded"
        assert c.image_bytes(solo, 0, "o") == got[jid], jid
    m = scrape(int(r.hget(keys.worker(w.name), "metrics_port")))
    assert sum(v for s, v in m.items() if s.startswith("latentd_worker_preemptions_total")) >= 1
    assert sum(v for s, v in m.items() if s.startswith("latentd_worker_parked_seconds_total")) > 0
    assert any(s.startswith("latentd_worker_queue_wait_by_priority_seconds_count")
               and 'priority="high"' in s for s in m)
