"""LATENTD_STORAGE=s3 against a real S3 API over HTTP: moto's standalone server (`python -m
moto.server`, a separate process on 127.0.0.1) with a real worker and real APIs. Images land in
the bucket (not in Redis), are read back through the API and through presigned URLs, the
lifecycle rule is set without touching the bucket's other rules, and an unreachable store fails
the job clearly while the worker goes on (and succeeds once the store is back)."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from latentd.config.settings import Settings
from devkit.api_proc import ALICE, BOB, KEYS, ApiProc, open_png, wait_job
from devkit.services import RedisServer, WorkerProc, free_port
from latentd.jobs.client import JobClient
from latentd.jobs.spec import JobSpec

BUCKET, PREFIX = "latentd-test", "img/"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}   # boto3's standard chain reads these


class S3Server:
    """moto's S3-compatible HTTP server as its own process."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="latentd-moto-", suffix=".log", delete=False)
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def public_url(self) -> str:
        """The same server by another name, as clients outside would reach a store."""
        return f"http://localhost:{self.port}"

    def start(self) -> "S3Server":
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                      "-p", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url, timeout=1)
                return self
            except httpx.HTTPError:
                assert self.proc.poll() is None, open(self.log.name).read()
                time.sleep(0.1)
        raise RuntimeError("moto server did not answer")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def s3_settings(endpoint: str, **over) -> dict:
    return dict(storage="s3", s3_bucket=BUCKET, s3_prefix=PREFIX, s3_endpoint_url=endpoint,
                s3_region="us-east-1", **over)


def with_aws(proc):
    proc.env.update(AWS)
    return proc


@pytest.fixture(scope="module")
def s3(tiny_model):
    """moto + Redis + one S3 worker (expiry 2 days) + an API reading through itself + an API
    handing out presigned URLs. The bucket has someone else's lifecycle rule beforehand."""
    started = []
    try:
        server = S3Server().start()
        started.append(server)
        c = server.client()
        c.create_bucket(Bucket=BUCKET)
        c.put_bucket_lifecycle_configuration(Bucket=BUCKET, LifecycleConfiguration={"Rules": [
            {"ID": "keep-logs", "Status": "Enabled", "Filter": {"Prefix": "logs/"},
             "Expiration": {"Days": 30}}]})
        redis = RedisServer().start()
        started.append(redis)
        worker = with_aws(WorkerProc(redis.url, str(tiny_model),
                                     **s3_settings(server.url, s3_expire_days=2))).start()
        started.append(worker)
        apis = {}
        # the presigning API signs for another name of the same server (clients' address)
        for name, extra in (("through", {}),
                            ("presign", {"s3_presign": "true",
                                         "s3_presign_endpoint_url": server.public_url})):
            apis[name] = with_aws(ApiProc(redis.url, api_keys=KEYS, model=str(tiny_model),
                                          rate_limit_per_s=0, **s3_settings(server.url, **extra)))
            started.append(apis[name])
        for a in apis.values():
            a.start()
        worker.wait_ready()
        yield {"server": server, "redis": redis, "worker": worker, **apis}
    finally:
        for p in reversed(started):
            p.stop()


def submit(api, key=ALICE, **body) -> dict:
    with api.client(key) as c:
        r = c.post("/v1/jobs", json={"prompt": "a blue square", "steps": 2, **body})
        assert r.status_code == 202, r.text
        return wait_job(c, r.json()["id"])


def test_images_live_in_the_bucket_and_are_served_by_the_api(s3):
    api = s3["through"]
    job = submit(api, n=2, seed=5)
    assert job["status"] == "succeeded", (job, s3["worker"].output())
    jid = job["id"]
    c = s3["server"].client()
    objs = {o["Key"]: o for o in c.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}{jid}/")["Contents"]}
    assert sorted(objs) == [f"{PREFIX}{jid}/0.png", f"{PREFIX}{jid}/1.png"]
    stored = c.get_object(Bucket=BUCKET, Key=f"{PREFIX}{jid}/0.png")
    assert stored["ContentType"] == "image/png"
    body = stored["Body"].read()
    # Redis keeps only the job record
    assert s3["redis"].client().keys("latentd:img:*") == []
    with api.client(ALICE) as a:
        r = a.get(f"/v1/jobs/{jid}/images/0")
        assert r.status_code == 200 and r.content == body
        open_png(r.content)
    url = job["images"][1]["url"]                 # our signed URL: no header needed
    assert url.startswith(api.url)
    assert httpx.get(url).content == c.get_object(Bucket=BUCKET, Key=f"{PREFIX}{jid}/1.png")["Body"].read()
    with api.client(BOB) as b:                    # another tenant: 404, as with every store
        assert b.get(f"/v1/jobs/{jid}/images/0").status_code == 404


def test_presigned_urls_fetch_the_object(s3):
    api = s3["presign"]
    job = submit(api, seed=9)
    assert job["status"] == "succeeded"
    url = job["images"][0]["url"]
    assert url.startswith(f"{s3['server'].public_url}/{BUCKET}/{PREFIX}{job['id']}/0.png?")
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=3600" in url     # LATENTD_URL_TTL_S
    r = httpx.get(url)                            # straight from the store, no API involved
    assert r.status_code == 200
    assert r.content == s3["server"].client().get_object(
        Bucket=BUCKET, Key=f"{PREFIX}{job['id']}/0.png")["Body"].read()
    open_png(r.content)
    with api.client(ALICE) as a:                  # the OpenAI-style endpoint hands them out too
        res = a.post("/v1/images/generations", json={"prompt": "a circle", "steps": 2,
                                                     "response_format": "url"})
        assert res.status_code == 200, res.text
        assert res.json()["data"][0]["url"].startswith(f"{s3['server'].public_url}/{BUCKET}/{PREFIX}")
        assert httpx.get(res.json()["data"][0]["url"]).status_code == 200


def test_jpeg_and_webp_objects_carry_their_extension(s3):
    """The object is named and typed for what it holds; the API and the presigned URL find it."""
    c = s3["server"].client()
    for fmt, magic in (("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")):
        job = submit(s3["through"], seed=3, output_format=fmt)
        assert job["status"] == "succeeded", (job, s3["worker"].output())
        jid = job["id"]
        keys = [o["Key"] for o in c.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}{jid}/")["Contents"]]
        assert keys == [f"{PREFIX}{jid}/0.{fmt}"]
        stored = c.get_object(Bucket=BUCKET, Key=keys[0])
        assert stored["ContentType"] == f"image/{fmt}"
        body = stored["Body"].read()
        assert body.startswith(magic)
        with s3["through"].client(ALICE) as a:
            r = a.get(f"/v1/jobs/{jid}/images/0")
        assert r.status_code == 200 and r.content == body
        assert r.headers["content-type"] == f"image/{fmt}"
        with s3["presign"].client(ALICE) as a:      # both APIs share the Redis and the bucket
            url = a.get(f"/v1/jobs/{jid}").json()["images"][0]["url"]
        assert url.startswith(f"{s3['server'].public_url}/{BUCKET}/{PREFIX}{jid}/0.{fmt}?")
        assert httpx.get(url).content == body


def test_lifecycle_rule_set_and_other_rules_kept(s3):
    rules = {r["ID"]: r for r in s3["server"].client().get_bucket_lifecycle_configuration(
        Bucket=BUCKET)["Rules"]}
    mine = rules[f"latentd-expire:{PREFIX}"]
    assert mine["Status"] == "Enabled" and mine["Expiration"]["Days"] == 2
    assert mine["Filter"]["Prefix"] == PREFIX
    assert rules["keep-logs"]["Filter"]["Prefix"] == "logs/"           # someone else's, untouched
    assert "objects expire after 2 day(s)" in s3["worker"].output()


def test_unreachable_store_fails_the_job_and_the_worker_goes_on(s3, tiny_model):
    dead = free_port()                            # nothing listens here (yet)
    redis = s3["redis"]
    w = with_aws(WorkerProc(redis.url, str(tiny_model), queue_name="s3down",
                            **s3_settings(f"http://127.0.0.1:{dead}")))
    api_down = with_aws(ApiProc(redis.url, api_keys=KEYS, model=str(tiny_model),
                                **s3_settings(f"http://127.0.0.1:{dead}")))
    later = None
    try:
        w.start().wait_ready()
        c = JobClient(redis.client(), Settings(redis_url=redis.url, queue_name="s3down"))
        jid = c.submit(JobSpec(prompt="lost", owner="alice", steps=2, n=2))
        d = c.wait(jid, "alice", 120)
        assert d["status"] == "failed", (d, w.output())
        assert d["error"]["code"] == "storage_error"
        assert "could not store image" in d["error"]["message"]
        assert f"127.0.0.1:{dead}" in d["error"]["message"] and BUCKET in d["error"]["message"]
        assert w.alive()
        # the API reading from a store it cannot reach: 503 with Retry-After, never a 500
        api_down.start()
        ok = submit(s3["through"], seed=1)        # an image that exists, in the real store
        with api_down.client(ALICE) as a:
            r = a.get(f"/v1/jobs/{ok['id']}/images/0")
        assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable"
        assert "Retry-After" in r.headers
        # the store comes back: the same worker's next job succeeds
        later = S3Server(port=dead).start()
        later.client().create_bucket(Bucket=BUCKET)
        jid2 = c.submit(JobSpec(prompt="kept", owner="alice", steps=2))
        d2 = c.wait(jid2, "alice", 120)
        assert d2["status"] == "succeeded", (d2, w.output())
        assert later.client().head_object(Bucket=BUCKET, Key=f"{PREFIX}{jid2}/0.png")["ContentLength"] > 0
    finally:
        for p in (later, api_down, w):
            if p is not None:
                p.stop()


def test_s3_store_needs_a_bucket():
    from latentd.jobs.store import make_store

    with pytest.raises(ValueError, match="LATENTD_S3_BUCKET"):
        make_store(None, Settings(storage="s3", s3_bucket=""))
