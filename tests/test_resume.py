"""Resume from saved row states (worker/checkpoint.py, model/row_state.py), end to end on a real
redis-server and real worker processes: a SIGKILLed worker's job goes on on another worker from
its last saved step and its images equal an uninterrupted run's; saves are fenced by attempt;
rows that do not match their job are ignored. Polls with deadlines, never sleeps."""
from __future__ import annotations

import json

import pytest

from devkit.services import assert_exactly_once, free_port, poll, scrape
from latentd.jobs import keys
from latentd.jobs.jobstore import ImageResult, JobStore
from latentd.jobs.spec import JobSpec
from latentd.model.row_state import RowState
from latentd.worker.checkpoint import spec_hash

Q = "latentd"
K = 4                                   # LATENTD_CHECKPOINT_EVERY_STEPS in these tests


def saved_steps(r, jid) -> dict[int, int]:
    return {int(k): RowState.from_bytes(v).step for k, v in r.hgetall(keys.checkpoint(jid)).items()}


def reference_png(stack, c, worker, spec: JobSpec, n: int) -> list[bytes]:
    """The same spec run uninterrupted as another job (a job's PNG bytes depend only on its spec)."""
    jid = c.submit(spec)
    assert c.wait(jid, "o", 120)["status"] == "succeeded", worker.output()
    return [c.image_bytes(jid, k, "o") for k in range(n)]


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
def test_sigkilled_worker_job_resumes_from_its_last_saved_step(stack, sampler):
    """euler_a draws noise from the request's generator every step, dpmpp_2m keeps x0 history:
    both go on exactly. Lost work per image = steps run before the kill - resumed step <= K."""
    # progress written every tick (right after that tick's saves): p:<k> at the kill is the
    # steps image k had completed (one fewer if killed between its step and that write)
    a = stack.start(checkpoint_every_steps=K, progress_interval_s=0)
    c, r = stack.client(), stack.redis.client()
    spec = JobSpec(prompt="a red circle", owner="o", steps=120, n=2, seed=5, sampler=sampler)
    jid = c.submit(spec)
    poll(lambda: (lambda s: len(s) == 2 and min(s.values()) >= 3 * K)(
        saved_steps(r, jid)), 60.0, every=0, name="rows saved at step >= 3K")
    # the worst moment: K - 1 steps past the last save (the next one is due at the next step)
    poll(lambda: int(stack.record(jid)["p:0"]) % K == K - 1, 30, every=0, name="a step before a save")
    a.kill()
    at_kill = {k: int(stack.record(jid)[f"p:{k}"]) for k in (0, 1)}
    saved = saved_steps(r, jid)
    b = stack.start(checkpoint_every_steps=K, worker_metrics_port=free_port())
    d = c.wait(jid, "o", 120)
    assert d["status"] == "succeeded", b.output()
    assert d["attempts"] == 2 and d["resumed_from_step"] == sum(saved.values()), (d, saved)
    lost = {k: at_kill[k] - saved[k] for k in (0, 1)}
    print(f"{sampler}: saved at {saved}, progress at kill {at_kill}, "
          f"lost per image {lost} (bound K = {K}), resumed_from_step {d['resumed_from_step']}")
    assert all(0 <= x <= K for x in lost.values()), lost
    assert "resumed at step" in b.output()
    port = int(r.hget(keys.worker(b.name), "metrics_port"))
    m = scrape(port)
    resumed = sum(v for s, v in m.items() if s.startswith("latentd_worker_resumed_steps_total"))
    assert resumed == sum(saved.values()), m
    assert r.exists(keys.checkpoint(jid)) == 0                         # deleted when the job ended
    assert [c.image_bytes(jid, k, "o") for k in (0, 1)] == reference_png(stack, c, b, spec, 2)
    assert_exactly_once(stack, [jid])


def test_graceful_stop_saves_every_row_and_the_next_worker_loses_nothing(stack):
    """SIGTERM with no grace: the rows are saved as they are (forced) before the job goes back."""
    a = stack.start(checkpoint_every_steps=1000, checkpoint_every_s=0, worker_grace_s=0)
    c, r = stack.client(), stack.redis.client()
    spec = JobSpec(prompt="a blue square", owner="o", steps=60, seed=9, sampler="ddpm")
    jid = c.submit(spec)
    poll(lambda: int(stack.record(jid).get("p:0", 0) or 0) >= 5, 60.0, every=0, name="progress >= 5")
    assert a.terminate() == 0
    step = saved_steps(r, jid)[0]
    assert step >= 5 and stack.record(jid)["status"] == "queued"
    b = stack.start(checkpoint_every_steps=1000, checkpoint_every_s=0)
    d = c.wait(jid, "o", 120)
    assert d["status"] == "succeeded" and d["resumed_from_step"] == step, d
    assert [c.image_bytes(jid, 0, "o")] == reference_png(stack, c, b, spec, 1)


def test_checkpoints_that_do_not_match_their_job_are_ignored(stack, tiny_model):
    """Rows saved under another model, job, spec, image, or for another request are not resumed:
    each of those images runs from step 0 and equals the uninterrupted run."""
    from latentd.config.settings import Settings
    from latentd.jobs.models import served
    from latentd.model.pipeline import GenerationRequest, load_pipeline

    c, r = stack.client(), stack.redis.client()
    spec = JobSpec(prompt="a green triangle", owner="o", steps=12, n=5, seed=20, sampler="euler_a")
    jid = c.submit(spec)
    rec = stack.record(jid)
    pipe = load_pipeline(tiny_model, safety=False)
    model_name = served(Settings(model=str(tiny_model))).name        # the name the worker serves it as
    checked = spec.check(pipe.info)

    def row(index, seed_shift=0, **meta):
        kw = checked.image_request_kwargs(index)
        req = GenerationRequest(**{**kw, "seed": kw["seed"] + seed_shift})  # shifted: another request
        s = pipe.start(req, pipe.encode([req])[0])
        for _ in range(3):
            pipe.step([s])
        tags = {"job": jid, "attempt": 0, "spec": spec_hash(rec["spec"]), "k": index, "model": model_name}
        return pipe.save_row(s, {**tags, **meta}).to_bytes()

    r.hset(keys.checkpoint(jid), mapping={
        0: row(0, model="another-model"),
        1: row(1, job="another-job"),
        2: row(2, spec=spec_hash(rec["spec"] + " ")),
        3: row(3, k=4),
        4: row(4, seed_shift=1),                        # tags fit, the request does not
    })
    w = stack.start()
    d = c.wait(jid, "o", 120)
    assert d["status"] == "succeeded", w.output()
    assert d["attempts"] == 1 and d["resumed_from_step"] is None
    out = w.output()
    for reason in ("other_model", "other_job", "other_spec", "other_image"):
        assert f"ignored ({reason})" in out, out
    assert "saved row not resumed, starting over" in out and "resumed at step" not in out
    assert [c.image_bytes(jid, k, "o") for k in range(5)] == reference_png(stack, c, w, spec, 5)


def test_saves_are_fenced_by_attempt(redis_server):
    """A save from an attempt that no longer runs the job is refused; a recorded image's row is
    dropped and never saved again; the job's end deletes its rows."""
    from latentd.config.settings import Settings
    from latentd.jobs.client import JobClient

    s = Settings(redis_url=redis_server.url)
    c = JobClient(redis_server.client(), s)
    js = JobStore(redis_server.client(), Q, s.result_ttl_s)
    r = redis_server.client()
    jid = c.submit(JobSpec(prompt="x", owner="o", n=2))
    assert js.claim("w1", 60).attempt == 1
    assert js.save_rows(jid, 1, {0: b"row0-a1", 1: b"row1-a1"}) == 2
    assert js.requeue(jid, 1) and js.claim("w2", 60).attempt == 2
    assert js.save_rows(jid, 1, {0: b"stale"}) == -1                 # the old attempt: refused
    assert js.checkpoints(jid) == {0: b"row0-a1", 1: b"row1-a1"}
    assert js.save_rows(jid, 2, {0: b"row0-a2"}) == 1
    assert r.ttl(keys.checkpoint(jid)) > 0
    assert js.record_image(jid, 2, 0, json.dumps({"index": 0, "seed": 0}), 0.1, 50) is ImageResult.RECORDED
    assert js.checkpoints(jid) == {1: b"row1-a1"}
    assert js.save_rows(jid, 2, {0: b"late", 1: b"row1-a2"}) == 1   # image 0 is recorded: not saved
    assert js.checkpoints(jid) == {1: b"row1-a2"}
    assert js.record_image(jid, 2, 1, json.dumps({"index": 1, "seed": 1}), 0.1, 50) is ImageResult.SUCCEEDED
    assert r.exists(keys.checkpoint(jid)) == 0
    assert js.save_rows(jid, 2, {1: b"after the end"}) == -1
