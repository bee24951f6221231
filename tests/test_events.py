"""Watching a job: OpenAI-style partial image streaming through the official `openai` client, the
job event stream (order, content, cancel, Last-Event-ID resume, other keys), and
`latentd generate --server`. Real redis-server, real uvicorn API, real `latentd worker` on the
tiny model.

To see previews of a job submitted through POST /v1/jobs deterministically (a tiny job can end
before a listener that connects after the submit is noticed), the worker is paused (SIGSTOP)
while the job is queued and the stream is opened, then resumed: it claims the job with the
listener already registered, exactly as for a job that waits in a busy queue."""
import base64
import signal
import subprocess
import sys

import numpy as np
import pytest

from devkit.api_proc import ALICE, BOB, open_png, service_stack, wait_job
from devkit.services import ROOT
from tests.sse_client import Reader, read_all

FAST = {"steps": 6, "sampler": "euler"}


@pytest.fixture(scope="module")
def stack(tiny_model):
    with service_stack(tiny_model, progress_interval_s=0.05) as s:
        yield s


class paused:
    """The worker stops claiming (SIGSTOP) inside the block and goes on (SIGCONT) after it."""

    def __init__(self, worker):
        self.worker = worker

    def __enter__(self):
        self.worker.proc.send_signal(signal.SIGSTOP)

    def __exit__(self, *exc):
        self.worker.proc.send_signal(signal.SIGCONT)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(open_png(base64.b64decode(b64)).convert("RGB"), dtype=np.int16)


# --- OpenAI's stream --------------------------------------------------------------------------
def test_openai_client_streams_partials_then_the_same_image(stack):
    from openai import OpenAI

    client = OpenAI(base_url=stack["api"].url + "/v1", api_key=ALICE, max_retries=0, timeout=60)
    body = {"seed": 11, **FAST}
    stream = client.images.generate(prompt="a red square", size="64x64", stream=True,
                                    partial_images=2, extra_body=body)
    events = list(stream)
    types = [e.type for e in events]
    assert types[-1] == "image_generation.completed" and types.count("image_generation.completed") == 1
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    assert 1 <= len(partial) <= 2                                  # 6 steps, 2 partials: steps 2, 4
    assert types.index("image_generation.completed") > max(types.index(p.type) for p in partial)
    assert [p.partial_image_index for p in partial] == list(range(len(partial)))
    for p in partial:
        assert p.size == "64x64" and p.output_format == "png" and p.created_at > 0
        assert open_png(base64.b64decode(p.b64_json)).size == (64, 64)
    done = events[-1]
    u = done.usage                      # that image's (jobs/usage.py): 8x8 latent positions x 6 steps
    assert u.output_tokens == 64 * 6 and u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.text_tokens > 0 and done.size == "64x64" and done.quality == "low"
    assert (done.model_extra or {}).get("seed") == 11
    assert (done.model_extra or {}).get("nsfw") in (True, False)

    same = client.images.generate(prompt="a red square", size="64x64", response_format="b64_json",
                                  extra_body=body)
    assert np.array_equal(pixels(done.b64_json), pixels(same.data[0].b64_json))
    # partial images are previews, not the image: none of them equals it
    assert not any(np.array_equal(pixels(p.b64_json), pixels(done.b64_json)) for p in partial)


def test_openai_stream_without_partials_and_bad_values(stack):
    from openai import OpenAI

    client = OpenAI(base_url=stack["api"].url + "/v1", api_key=ALICE, max_retries=0, timeout=60)
    events = list(client.images.generate(prompt="a blue circle", size="64x64", stream=True,
                                         partial_images=0, n=2, extra_body={"seed": 3, **FAST}))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert sorted((e.model_extra or {})["seed"] for e in events) == [3, 4]
    with pytest.raises(Exception) as bad:
        list(client.images.generate(prompt="x", size="64x64", stream=True, partial_images=4))
    assert getattr(bad.value, "status_code", None) == 422
    with stack["api"].client(ALICE) as http:
        depth = stack["redis"].client().llen("rq:queue:latentd")
        r = http.post("/v1/images/generations", json={"prompt": "x", "partial_images": 2})
        assert r.status_code == 422 and r.json()["error"]["field"] == "partial_images"
        r = http.post("/v1/images/generations", json={"prompt": "x", "stream": "yes"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "stream"
        assert stack["redis"].client().llen("rq:queue:latentd") == depth      # nothing queued


# --- the job event stream ---------------------------------------------------------------------
def test_event_stream_order_and_content(stack):
    api, worker = stack["api"], stack["worker"]
    with api.client(ALICE) as alice:
        with paused(worker):
            jid = alice.post("/v1/jobs", json={"prompt": "a green circle", "size": "64x64", "n": 2,
                                               "seed": 21, "steps": 24, "sampler": "euler"}).json()["id"]
            reader = Reader(api.client(ALICE), f"/v1/jobs/{jid}/events?preview_every=10")
            reader.start()
            queued = reader.wait_for(lambda e: e.type == "queued", 30)
            assert queued.id is None and queued.data["position"] == 0
        reader.join(60)
        assert reader.error is None and reader.status == 200
        evs = reader.events
        types = [e.type for e in evs]
        assert types[-1] == "succeeded" and types.count("succeeded") == 1
        final = evs[-1].data
        assert final["id"] == jid and final["status"] == "succeeded" and len(final["images"]) == 2
        # every event from the stream has an id, increasing; only made-up `queued` ones have none
        ids = [e.id for e in evs if e.type != "queued"]
        assert all(ids) and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
        assert all(e.id is None for e in evs if e.type == "queued")
        first_running = types.index("running")
        assert all(t == "queued" for t in types[:first_running])
        running = [e.data for e in evs if e.type == "running"]
        assert [r["step"] for r in running] == sorted(r["step"] for r in running)
        assert all(r["total"] == 48 for r in running)
        assert any(r.get("eta_s") is not None for r in running)
        previews = [e.data for e in evs if e.type == "preview"]
        assert {(p["index"], p["step"]) for p in previews} == {(0, 10), (0, 20), (1, 10), (1, 20)}
        for p in previews:
            assert (p["width"], p["height"], p["total"]) == (64, 64, 24)
            assert open_png(base64.b64decode(p["png"])).size == (8, 8)      # latent cells, no decode
        images = {e.data["index"]: (i, e.data) for i, e in enumerate(evs) if e.type == "image"}
        assert set(images) == {0, 1}
        for k, (pos, im) in images.items():
            assert im["seed"] == 21 + k and "sig=" in im["url"]
            assert all(i < pos for i, e in enumerate(evs) if e.type == "preview" and e.data["index"] == k)
            assert open_png(alice.get(im["url"]).content).size == (64, 64)


def test_resume_with_last_event_id(stack):
    api = stack["api"]
    with api.client(ALICE) as alice:
        jid = alice.post("/v1/jobs", json={"prompt": "a yellow square", "size": "64x64", "n": 2,
                                           "seed": 5, **FAST}).json()["id"]
        assert wait_job(alice, jid)["status"] == "succeeded"
        full = read_all(alice, f"/v1/jobs/{jid}/events")
        # nobody listened while it ran: only the claim, the images and the end were published
        assert [e.type for e in full] == ["running", "image", "image", "succeeded"]
        with_ids = [e for e in full if e.id]
        for cut in (0, 2, len(with_ids) - 2):
            rest = read_all(alice, f"/v1/jobs/{jid}/events", {"Last-Event-ID": with_ids[cut].id})
            assert [(e.id, e.type) for e in rest] == [(e.id, e.type) for e in with_ids[cut + 1:]]
        bad = alice.get(f"/v1/jobs/{jid}/events", headers={"Last-Event-ID": "yesterday"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "Last-Event-ID"
        bad = alice.get(f"/v1/jobs/{jid}/events?preview_every=1000")
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "preview_every"


def test_cancel_mid_stream(stack):
    api = stack["api"]
    with api.client(ALICE) as alice:
        jid = alice.post("/v1/jobs", json={"prompt": "slow", "size": "64x64", "n": 4,
                                           "steps": 150, "sampler": "euler"}).json()["id"]
        reader = Reader(api.client(ALICE), f"/v1/jobs/{jid}/events?preview_every=10")
        reader.start()
        reader.wait_for(lambda e: e.type == "running" and e.data["step"] > 0, 60)
        assert alice.delete(f"/v1/jobs/{jid}").status_code == 200
        reader.join(30)
        assert not reader.is_alive() and reader.error is None
        last = reader.events[-1]
        assert last.type == "canceled" and last.id
        assert last.data["status"] == "canceled" and last.data["error"]["code"] == "canceled"
        assert not any(e.type == "image" for e in reader.events)


def test_another_key_gets_404(stack):
    api = stack["api"]
    with api.client(ALICE) as alice, api.client(BOB) as bob, api.client() as nobody:
        jid = alice.post("/v1/jobs", json={"prompt": "mine", "size": "64x64", **FAST}).json()["id"]
        r = bob.get(f"/v1/jobs/{jid}/events")
        assert r.status_code == 404 and r.json()["error"]["field"] == "job_id"
        assert bob.get(f"/v1/jobs/{'0' * 32}/events").status_code == 404
        assert nobody.get(f"/v1/jobs/{jid}/events").status_code == 401
        wait_job(alice, jid)


def test_recent_jobs_are_the_keys_own(stack):
    api = stack["api"]
    with api.client(ALICE) as alice, api.client(BOB) as bob:
        mine = [alice.post("/v1/jobs", json={"prompt": f"recent {i}", "size": "64x64", **FAST}).json()["id"]
                for i in range(3)]
        theirs = bob.post("/v1/jobs", json={"prompt": "bob's", "size": "64x64", **FAST}).json()["id"]
        listed = alice.get("/v1/jobs?limit=3").json()
        assert listed["object"] == "list" and [j["id"] for j in listed["data"]] == mine[::-1]
        assert listed["data"][0]["params"]["prompt"] == "recent 2" and "links" in listed["data"][0]
        assert theirs not in [j["id"] for j in alice.get("/v1/jobs?limit=50").json()["data"]]
        assert [j["id"] for j in bob.get("/v1/jobs").json()["data"]][0] == theirs
        bad = alice.get("/v1/jobs?limit=0")
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "limit"
        for jid in mine:
            wait_job(alice, jid)
        wait_job(bob, theirs)


# --- latentd generate --server ----------------------------------------------------------------
def test_cli_generate_against_the_server(stack, tmp_path):
    api = stack["api"]
    out = tmp_path / "cli.png"
    env = dict(stack["worker"].env, LATENTD_API_KEY=ALICE)
    base = [sys.executable, "-m", "latentd.cli", "generate"]
    done = subprocess.run(base + ["a purple triangle", "--server", api.url, "--out", str(out),
                                  "--size", "64x64", "--steps", "6", "--sampler", "euler",
                                  "--seed", "9"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert open_png(out.read_bytes()).size == (64, 64)
    assert "seed=9" in done.stdout and "denoising" in done.stderr      # the progress bar ran
    with api.client(ALICE) as alice:
        same = alice.post("/v1/images/generations", json={
            "prompt": "a purple triangle", "size": "64x64", "steps": 6, "sampler": "euler",
            "seed": 9, "response_format": "b64_json"}).json()
    assert np.array_equal(pixels(same["data"][0]["b64_json"]),
                          np.asarray(open_png(out.read_bytes()).convert("RGB"), dtype=np.int16))
    bad = subprocess.run(base + ["x", "--server", api.url, "--out", str(tmp_path / "no.png"),
                                 "--size", "1000x1000"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "invalid size" in bad.stderr and not (tmp_path / "no.png").exists()
    wrong_key = subprocess.run(base + ["x", "--server", api.url, "--key", "ltd_wrong", "--out",
                                       str(tmp_path / "no.png")], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=60)
    assert wrong_key.returncode == 2 and "Authorization" in wrong_key.stderr


def test_stream_answers_of_every_shape_and_sse_frames():
    from latentd.app.errors import ApiError
    from latentd.app.events import parse_last_event_id, sse, stream_entries

    e1, e2 = (b"1-0", {b"type": b"running"}), (b"2-0", {b"type": b"image"})
    for shape in ([[b"k", [e1, e2]]], {b"k": [e1, e2]}, {b"k": [[e1, e2]]}):
        assert stream_entries(shape) == [e1, e2]
    assert stream_entries(None) == [] and stream_entries({}) == [] and stream_entries({b"k": [[]]}) == []
    assert sse("image", {"a": 1}, "5-0") == b'id: 5-0\nevent: image\ndata: {"a":1}\n\n'
    assert sse("queued", {"position": 0}) == b'event: queued\ndata: {"position":0}\n\n'
    assert parse_last_event_id("1712345678901-3") == "1712345678901-3"
    assert parse_last_event_id(None) is None and parse_last_event_id("") is None
    for bad in ("x", "1-", "-1", "1-2-3", "1 -2", "9" * 21 + "-0"):
        with pytest.raises(ApiError):
            parse_last_event_id(bad)
