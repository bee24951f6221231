"""Webhooks against a real receiver: a small HTTP server on 127.0.0.1 in this process, a real
redis-server, API and `latentd worker` (tiny model, short backoff). Signature, retries after a
500, a receiver that comes up late, a worker killed before delivery, the allow-list."""
import http.server
import json
import threading
import time

import pytest

from devkit.api_proc import ALICE, KEYS, ApiProc, wait_job
from devkit.services import RedisServer, WorkerProc, free_port
from latentd.jobs import keys, webhooks
from latentd.worker.webhook_delivery import Deliverer

SECRET = "test-webhook-secret-0123456789"
FAST = {"size": "64x64", "steps": 2, "sampler": "euler"}
HOOK_SETTINGS = {"webhook_allow": "127.0.0.1,*.hooks.example", "webhook_secret": SECRET,
                 "webhook_backoff_s": 0.2, "webhook_backoff_max_s": 0.5, "webhook_timeout_s": 2}


class Receiver:
    """An HTTP server that records every POST and answers with the next status of `answers`
    (then 200)."""

    def __init__(self, port: int | None = None, answers=()):
        self.port = port or free_port()
        self.answers = list(answers)
        self.got: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = outer.answers.pop(0) if outer.answers else 200
                outer.got.append({"headers": dict(self.headers), "body": body, "status": status})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def wait(self, count: int, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.got) < count:
            time.sleep(0.02)
        assert len(self.got) >= count, f"{len(self.got)} deliveries, wanted {count}"
        return self.got

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def stack(tiny_model):
    redis_srv = RedisServer().start()
    st = {"redis": redis_srv, "model": tiny_model, "api": None, "worker": None}
    try:
        st["api"] = ApiProc(redis_srv.url, api_keys=KEYS, model=tiny_model, rate_limit_per_s=0,
                            **HOOK_SETTINGS).start()
        st["worker"] = WorkerProc(redis_srv.url, tiny_model, **HOOK_SETTINGS).start().wait_ready(180)
        yield st
    finally:
        for p in (st["worker"], st["api"]):          # the worker may have been replaced by a test
            if p:
                p.stop()
        redis_srv.stop()


def submit(api, callback_url: str, **kw) -> str:
    with api.client(ALICE) as alice:
        r = alice.post("/v1/jobs", json={"prompt": "a hook", "seed": 1, "callback_url": callback_url,
                                         **FAST, **kw})
        assert r.status_code == 202, r.text
        return r.json()["id"]


def attempts(redis_srv, job_id: str) -> int:
    return int(redis_srv.client().hget(keys.webhook(job_id), "attempts") or 0)


def test_signature_verifies_and_a_500_is_retried(stack):
    rx = Receiver(answers=[500])
    try:
        jid = submit(stack["api"], rx.url)
        first, second = rx.wait(2)[:2]
        for d in (first, second):
            h = d["headers"]
            assert h[webhooks.ID_HEADER] == jid and h["Content-Type"] == "application/json"
            assert webhooks.verify(SECRET.encode(), h[webhooks.TIMESTAMP_HEADER], d["body"],
                                   h[webhooks.SIGNATURE_HEADER])
            # a changed body, another secret, or a replay long after the timestamp fail
            assert not webhooks.verify(SECRET.encode(), h[webhooks.TIMESTAMP_HEADER],
                                       d["body"] + b" ", h[webhooks.SIGNATURE_HEADER])
            assert not webhooks.verify(b"another-secret-0123456789", h[webhooks.TIMESTAMP_HEADER],
                                       d["body"], h[webhooks.SIGNATURE_HEADER])
            assert not webhooks.verify(SECRET.encode(), h[webhooks.TIMESTAMP_HEADER], d["body"],
                                       h[webhooks.SIGNATURE_HEADER], now=time.time() + 3600)
        assert first["status"] == 500 and second["status"] == 200
        assert first["body"] == second["body"]                # the same bytes on every attempt
        doc = json.loads(second["body"])
        assert doc["type"] == "job.succeeded" and doc["id"] == jid
        assert doc["job"]["status"] == "succeeded" and doc["job"]["images"][0]["seed"] == 1
        assert "owner" not in json.dumps(doc["job"]["params"])
        time.sleep(1.0)
        assert len(rx.got) == 2                               # delivered: not sent again
        r = stack["redis"].client()
        assert r.zscore(keys.WEBHOOKS_DUE, jid) is None and not r.exists(keys.webhook(jid))
    finally:
        rx.stop()


def test_a_receiver_that_comes_up_late_still_gets_it(stack):
    port = free_port()                                        # nothing listens there yet
    jid = submit(stack["api"], f"http://127.0.0.1:{port}/late")
    deadline = time.monotonic() + 60
    while attempts(stack["redis"], jid) < 3:                  # refused, refused, refused...
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rx = Receiver(port=port)
    try:
        got = rx.wait(1)
        assert json.loads(got[0]["body"])["id"] == jid
    finally:
        rx.stop()


def test_a_worker_killed_before_delivery_does_not_lose_it(stack):
    port = free_port()
    jid = submit(stack["api"], f"http://127.0.0.1:{port}/after-crash")
    with stack["api"].client(ALICE) as alice:
        assert wait_job(alice, jid)["status"] == "succeeded"
    deadline = time.monotonic() + 30
    while attempts(stack["redis"], jid) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stack["worker"].stop()                                    # the only worker: SIGKILL
    r = stack["redis"].client()
    assert r.zscore(keys.WEBHOOKS_DUE, jid) is not None       # the delivery is state in Redis
    rx = Receiver(port=port)
    try:
        time.sleep(1.0)
        assert rx.got == []                                   # nobody left to deliver it
        stack["worker"] = WorkerProc(stack["redis"].url, stack["model"], **HOOK_SETTINGS).start()
        stack["worker"].wait_ready(180)
        got = rx.wait(1)
        assert json.loads(got[0]["body"])["job"]["status"] == "succeeded"
    finally:
        rx.stop()


@pytest.mark.parametrize("url", [
    "http://10.1.2.3/hook", "http://example.com/hook", "http://127.0.0.2/hook",
    "ftp://127.0.0.1/hook", "http://user:pw@127.0.0.1/hook", "/relative", "http://hooks.example/x",
])
def test_a_url_off_the_allow_list_is_refused(stack, url):
    r = stack["redis"].client()
    depth = r.llen("rq:queue:latentd")
    with stack["api"].client(ALICE) as alice:
        resp = alice.post("/v1/jobs", json={"prompt": "x", "callback_url": url, **FAST})
    assert resp.status_code == 422
    err = resp.json()["error"]
    assert err["field"] == "callback_url" and err["message"].startswith("callback_url: ")
    assert r.llen("rq:queue:latentd") == depth               # nothing queued


def test_allow_list_rules():
    allow = "127.0.0.1, 10.0.0.0/8, hooks.internal, *.example.org, ::1"
    ok = ["http://127.0.0.1:9000/x", "https://10.20.30.40/x", "http://HOOKS.internal/x",
          "https://a.b.example.org/x", "http://[::1]:8080/x"]
    bad = ["http://127.0.0.2/x", "http://11.0.0.1/x", "http://example.org/x",
           "http://hooks.internal.evil.com/x", "http://evil-example.org/x", "gopher://127.0.0.1/",
           "http://127.0.0.1:0/x", "http://[::2]/x", "http://127.0.0.1:99999/x"]
    for url in ok:
        assert webhooks.url_problem(url, allow) is None, url
    for url in bad:
        assert webhooks.url_problem(url, allow) is not None, url
    assert "off" in webhooks.url_problem("http://127.0.0.1/x", "")


def test_api_refuses_to_start_outside_dev_without_a_webhook_secret():
    from latentd.app.main import config_problems
    from latentd.config.settings import Settings

    s = Settings(env="prod", signing_secret="x" * 32, auth="off", webhook_allow="127.0.0.1")
    assert any("LATENTD_WEBHOOK_SECRET" in p for p in config_problems(s))
    s = Settings(env="prod", signing_secret="x" * 32, auth="off", webhook_allow="127.0.0.1",
                 webhook_secret=SECRET)
    assert config_problems(s) == []


def test_a_delivery_is_given_up_after_max_age(redis_server):
    """In process against a real redis-server: ending a job that carries a callback queues its
    delivery in the same Lua transition; a receiver that never answers is retried until
    webhook_max_age_s, then the delivery is dropped and the record says why."""
    from latentd.config.settings import Settings
    from latentd.jobs.jobstore import FinishResult, JobStore

    s = Settings(env="dev", redis_url=redis_server.url, webhook_allow="127.0.0.1",
                 webhook_secret=SECRET, webhook_backoff_s=0.05, webhook_backoff_max_s=0.1,
                 webhook_max_age_s=0.5, webhook_timeout_s=1)
    r = redis_server.client()
    jid = "ab" * 16
    r.hset(keys.job(jid), mapping={"id": jid, "owner": "o", "queue": "latentd", "status": "running",
                                   "attempt": 1, "n": 1, "steps": 1, "spec": "{}",
                                   "callback": f"http://127.0.0.1:{free_port()}/never"})
    assert JobStore(r, "latentd", 3600).finish(jid, "failed", {"code": "engine_error", "message": "x"}) \
        is FinishResult.ENDED
    assert r.zscore(keys.WEBHOOKS_DUE, jid) is not None
    assert r.hget(keys.webhook(jid), "url").decode().endswith("/never")
    deliverer = Deliverer(s, "test")
    deadline = time.monotonic() + 30
    while r.zscore(keys.WEBHOOKS_DUE, jid) is not None:
        assert time.monotonic() < deadline
        if not deliverer.deliver_one():
            time.sleep(0.02)
    assert attempts(redis_server, jid) == 0 and not r.exists(keys.webhook(jid))
    assert r.hget(keys.job(jid), "webhook").decode().startswith("failed: ")
