"""Many models behind one endpoint: a deployment of the bundled model (`shapes`, the default),
the tiny random SD model (`tiny`) and a configs-only model nobody serves (`idle`). Real
redis-server, real uvicorn, one real `latentd worker --model shapes=... --model tiny=...`
(a supervisor: one worker process per model), the official `openai` client."""
from __future__ import annotations

import io
import json
import urllib.parse

import httpx
import openai
import pytest
from PIL import Image

from devkit.api_proc import ALICE, BOB, configs_only_model, models_stack
from devkit.services import poll, scrape
from latentd.config.settings import Settings
from latentd.jobs import keys
from latentd.jobs.client import JobClient
from latentd.jobs.jobstore import JobStore
from latentd.jobs.models import deployment, parse, with_cli
from latentd.jobs.spec import JobSpec
from latentd.model.info import BUNDLED

FAST = {"steps": 2, "sampler": "euler"}
NAMES = ["shapes", "tiny", "idle"]


@pytest.fixture(scope="module")
def multi(tiny_model):
    idle = configs_only_model()
    models = f"shapes={BUNDLED},tiny={tiny_model},idle={idle}"
    with models_stack(models, ("shapes", f"tiny={tiny_model}"), unserved=("idle",)) as stack:
        yield stack


def png_model(b64: str) -> tuple[str, tuple[int, int]]:
    import base64

    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    return json.loads(img.text["latentd"])["model"], img.size


def test_each_request_lands_on_its_models_worker(multi):
    client = openai.OpenAI(base_url=multi["api"].url + "/v1", api_key=ALICE, max_retries=0, timeout=120)
    for model, size, made_by in (("tiny", "48x48", "tiny"), ("shapes", "80x80", "shapes"),
                                 (None, "64x64", "shapes")):
        kw = {"model": model} if model else {}
        res = client.images.generate(prompt="a red circle", size=size, response_format="b64_json",
                                     extra_body={"seed": 3, **FAST}, **kw)
        assert png_model(res.data[0].b64_json) == (made_by, tuple(map(int, size.split("x"))))
    # the async API: the job's record names its model's queue and a worker of that model
    r = multi["redis"].client()
    with multi["api"].client(BOB) as c:
        jid = c.post("/v1/jobs", json={"prompt": "a blue square", "model": "tiny", **FAST}).json()["id"]
        job = poll(lambda: (lambda d: d if d["status"] == "succeeded" else None)(c.get(f"/v1/jobs/{jid}").json()))
    assert job["params"]["model"] == "tiny"
    rec = r.hgetall(keys.job(jid))
    assert rec[b"queue"] == b"latentd.tiny"
    worker = json.loads(r.hget(keys.worker(rec[b"worker"].decode()), "model"))
    assert worker["name"] == "tiny"


def test_metrics_carry_the_model(multi):
    r = multi["redis"].client()
    urls = {}
    for queue, model in (("latentd", "shapes"), ("latentd.tiny", "tiny")):
        (name,) = r.zrange(keys.workers(queue), 0, -1)
        urls[model] = r.hget(keys.worker(name.decode()), "metrics_url").decode()
    for model, url in urls.items():
        series = scrape(urllib.parse.urlsplit(url).port)
        assert series[f'latentd_worker_images_generated_total{{model="{model}"}}'] >= 1
        assert f'latentd_worker_step_seconds_count{{model="{model}"}}' in series
        assert not any('model="' in k and f'model="{model}"' not in k for k in series), model
    text = httpx.get(multi["api"].url + "/metrics", timeout=10).text
    assert 'latentd_ready_workers{model="tiny"} 1.0' in text
    assert 'latentd_ready_workers{model="idle"} 0.0' in text
    assert 'latentd_queue_depth{model="shapes"}' in text
    assert 'latentd_jobs_admitted_total{endpoint="images",model="tiny"}' in text


def test_unknown_model_is_a_422_listing_the_known_ones(multi):
    client = openai.OpenAI(base_url=multi["api"].url + "/v1", api_key=ALICE, max_retries=0, timeout=30)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.generate(prompt="x", model="dall-e-3")
    err = e.value.body if "field" in (e.value.body or {}) else e.value.body["error"]
    assert err["field"] == "model" and err["allowed"] == NAMES
    assert "dall-e-3" in err["message"]
    with multi["api"].client(ALICE) as c:
        before = multi["redis"].client().llen(keys.rq_queue("latentd"))
        r = c.post("/v1/jobs", json={"prompt": "x", "model": "nope"})
        assert r.status_code == 422 and r.json()["error"]["allowed"] == NAMES
        assert multi["redis"].client().llen(keys.rq_queue("latentd")) == before


def test_a_model_without_a_worker_queues_and_readyz_names_it(multi):
    with multi["api"].client(ALICE) as c:
        models = c.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == NAMES
        by = {m["id"]: m for m in models}
        assert by["shapes"]["default"] and not by["tiny"]["default"]
        assert (by["shapes"]["workers"], by["tiny"]["workers"], by["idle"]["workers"]) == (1, 1, 0)
        for m in models:                         # read from its folder (idle: no worker ever)
            assert m["info"]["native_width"] == 64 and m["info"]["samplers"], m
        assert by["shapes"]["info"]["classifier"] and by["tiny"]["info"]["classifier"] is None
        # its size rule is its own: idle allows multiples of 16 up to 256 a side
        bad = c.post("/v1/jobs", json={"prompt": "x", "model": "idle", "size": "1024x1024"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] in ("width", "size")
        jid = c.post("/v1/jobs", json={"prompt": "x", "model": "idle", **FAST}).json()["id"]
        job = c.get(f"/v1/jobs/{jid}").json()
        assert job["status"] == "queued" and job["queue_position"] == 0
        ready = c.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded" and ready.json()["no_workers"] == ["idle"]
        assert ready.json()["models"] == {"shapes": 1, "tiny": 1, "idle": 0}
        assert 'latentd_queue_depth{model="idle"} 1.0' in c.get("/metrics").text
        # the served models still run meanwhile
        done = c.post("/v1/jobs", json={"prompt": "x", "model": "tiny", **FAST}).json()["id"]
        poll(lambda: c.get(f"/v1/jobs/{done}").json()["status"] == "succeeded", timeout=120)
        assert c.get(f"/v1/jobs/{jid}").json()["status"] == "queued"
        assert c.delete(f"/v1/jobs/{jid}").json()["status"] == "canceled"


def test_fair_turns_across_owners_stay_within_a_model_queue(multi):
    """Claims on one model's queue take turns across owners; another model's queue, wait lists
    and owners are its own."""
    r = multi["redis"].client()
    s = Settings(redis_url=multi["redis"].url, queue_name="fair", models=f"m1={BUNDLED},m2={BUNDLED}")
    c = JobClient(r, s)
    q1, q2 = c.queue_of("m1"), c.queue_of("m2")
    assert (q1, q2) == ("fair", "fair.m2") and c.queue_of("m3") is None

    def submit(owner, queue):
        return c.submit(JobSpec(prompt="p", owner=owner, steps=2), queue=queue)
    flood = [submit("alice", q2) for _ in range(3)]
    bob = submit("bob", q2)
    carol = submit("carol", q1)
    assert r.lrange(keys.wait(q2, "alice"), 0, -1) == [j.encode() for j in flood]
    assert set(r.lrange(keys.owners(q2), 0, -1)) == {b"alice", b"bob"}
    assert r.lrange(keys.owners(q1), 0, -1) == [b"carol"]
    assert c.get(carol, "carol")["queue_position"] == 0 and c.get(bob, "bob")["queue_position"] == 3
    store = JobStore(r, q2, s.result_ttl_s)
    order = [store.claim("probe", 30).job_id for _ in range(4)]
    assert order == [flood[0], bob, flood[1], flood[2]]
    assert store.claim("probe", 30) is None                    # m1's job is not m2's to take
    assert JobStore(r, q1, s.result_ttl_s).claim("probe1", 30).job_id == carol


def test_model_lists_parse_and_merge():
    assert parse("a=/x, /y/tiny_sd1 ,c=org/repo") == [("a", "/x"), ("tiny_sd1", "/y/tiny_sd1"),
                                                      ("c", "org/repo")]
    for bad, word in (("a b=/x", "not allowed"), ("a=/x,a=/y", "twice"), ("a=", "no model folder")):
        with pytest.raises(ValueError, match=word):
            parse(bad)
    s = Settings(models="a=/x,b=/y")
    assert [(m.name, m.queue, m.default) for m in deployment(s)] == [
        ("a", "latentd", True), ("b", "latentd.b", False)]
    assert with_cli(s, ["b", "c=/z"]) == ("a=/x,b=/y,c=/z", ["b", "c"])
    assert with_cli(Settings(), ["/m/one", "two=/m/2"]) == ("one=/m/one,two=/m/2", ["one", "two"])
    # no LATENTD_MODELS: LATENTD_MODEL (else the bundled model) alone, on the plain queue
    (only,) = deployment(Settings(model="/m/sd15"))
    assert (only.name, only.queue) == ("sd15", "latentd")
