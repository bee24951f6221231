"""Auth, tenancy and signed URLs against a real uvicorn + redis-server (no worker needed here;
tests/test_api_e2e.py repeats the image checks on real images)."""
import hashlib
import json
import os
import subprocess
import sys
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from latentd.app import signing
from devkit.api_proc import ALICE, BOB, SECRET, ApiProc
from devkit.services import ROOT, free_port

OK = {"prompt": "a blue square", "size": "64x64"}


def test_401_without_a_key_or_with_a_wrong_key(api):
    for headers in ({}, {"Authorization": "Bearer ltd_wrong"}, {"Authorization": f"Basic {ALICE}"},
                    {"Authorization": "Bearer " + ALICE[:-1]}, {"Authorization": "Bearer"}):
        with httpx.Client(base_url=api.url, headers=headers) as c:
            for method, path, body in (("POST", "/v1/jobs", OK), ("POST", "/v1/images/generations", OK),
                                       ("GET", "/v1/jobs/" + "a" * 32, None), ("GET", "/v1/models", None),
                                       ("DELETE", "/v1/jobs/" + "a" * 32, None),
                                       ("GET", "/v1/jobs/" + "a" * 32 + "/images/0", None)):
                resp = c.request(method, path, json=body)
                assert resp.status_code == 401, (headers, path, resp.text)
                assert resp.json()["error"]["field"] == "Authorization"
                assert resp.headers["www-authenticate"] == "Bearer"
                assert ALICE not in resp.text
    with httpx.Client(base_url=api.url) as c:   # unauthenticated probes stay open
        assert c.get("/healthz").status_code == 200


def test_another_key_gets_404_on_job_image_and_cancel(api):
    with api.client(ALICE) as alice, api.client(BOB) as bob:
        job = alice.post("/v1/jobs", json=OK).json()
        jid = job["id"]
        assert bob.get(f"/v1/jobs/{jid}").status_code == 404
        assert bob.get(f"/v1/jobs/{jid}/images/0").status_code == 404
        assert bob.delete(f"/v1/jobs/{jid}").status_code == 404
        own = alice.get(f"/v1/jobs/{jid}")
        assert own.status_code == 200 and own.json()["status"] == "queued"   # bob's cancel did nothing
        assert alice.delete(f"/v1/jobs/{jid}").json()["status"] == "canceled"
        # unknown ids look exactly like other people's
        assert bob.get("/v1/jobs/" + "0" * 32).json() == bob.get(f"/v1/jobs/{jid}").json()


def _signed(job_id, k, owner="alice", ttl=600):
    return signing.signed_path(SECRET.encode(), owner, job_id, k, ttl)


def test_signed_urls_reject_tampering_expiry_and_moving(api):
    with api.client(ALICE) as alice:
        jid = alice.post("/v1/jobs", json=OK).json()["id"]
        other = alice.post("/v1/jobs", json=OK).json()["id"]
    with httpx.Client(base_url=api.url) as anon:            # no headers at all
        good = _signed(jid, 0)
        # valid signature: authorised; the image is just not rendered yet (no worker) -> 404
        assert anon.get(good).status_code == 404
        q = parse_qs(urlsplit(good).query)
        sig, exp = q["sig"][0], q["exp"][0]
        bad = {
            "tampered sig": f"/v1/jobs/{jid}/images/0?o=alice&exp={exp}&sig={sig[:-2]}AA",
            "later exp": f"/v1/jobs/{jid}/images/0?o=alice&exp={int(exp) + 3600}&sig={sig}",
            "moved to image 1": f"/v1/jobs/{jid}/images/1?o=alice&exp={exp}&sig={sig}",
            "moved to another job": f"/v1/jobs/{other}/images/0?o=alice&exp={exp}&sig={sig}",
            "other owner": f"/v1/jobs/{jid}/images/0?o=bob&exp={exp}&sig={sig}",
            "expired": _signed(jid, 0, ttl=-1),
            "wrong secret": signing.signed_path(b"another-secret-0123456789", "alice", jid, 0, 600),
            "no sig": f"/v1/jobs/{jid}/images/0?o=alice&exp={exp}",
            "garbage exp": f"/v1/jobs/{jid}/images/0?o=alice&exp=soon&sig={sig}",
        }
        for name, path in bad.items():
            resp = anon.get(path)
            assert resp.status_code == 403, (name, resp.status_code, resp.text)
            assert resp.json()["error"]["code"] == "bad_signature"


def test_job_urls_are_absolute_and_signed(api):
    with api.client(ALICE) as alice:
        created = alice.post("/v1/jobs", json=OK)
        assert created.status_code == 202
        body = created.json()
        assert body["links"]["self"].startswith(api.url + "/v1/jobs/")
        assert created.headers["location"] == body["links"]["self"]


def _cli(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "latentd.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_keys_create_prints_the_key_once_and_stores_only_its_hash(tmp_path, module_redis):
    path = tmp_path / "keys.json"
    env = {**os.environ, "LATENTD_KEYS_FILE": str(path), "PYTHONPATH": str(ROOT)}
    out = _cli("keys", "create", "carol", env=env)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert len(out.stdout.splitlines()) == 1 and key.startswith("ltd_") and len(key) > 40
    stored = json.loads(path.read_text())
    assert stored == {"carol": hashlib.sha256(key.encode()).hexdigest()}
    assert key not in path.read_text() and key not in out.stderr
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = _cli("keys", "create", "carol", env=env)
    assert again.returncode == 2 and "already exists" in again.stderr
    listed = _cli("keys", "list", env=env)
    assert listed.stdout.split() == ["carol"] and key not in listed.stdout
    # the stored hash authenticates the printed key, and nothing else
    from latentd.app.auth import KeyStore, load_keys
    from latentd.config.settings import Settings

    store = KeyStore(load_keys(Settings(keys_file=str(path))))
    assert store.owner(key) == "carol" and store.owner(key + "x") is None


def test_serve_refuses_to_start_without_keys_or_secret(tmp_path, module_redis):
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("LATENTD_")}
    base.update(PYTHONPATH=str(ROOT), LATENTD_REDIS_URL=module_redis.url,
                LATENTD_KEYS_FILE=str(tmp_path / "none.json"))
    refused = _cli("serve", "--port", str(port), env=base)
    assert refused.returncode == 2, refused.stderr
    assert "no API keys" in refused.stderr and "LATENTD_SIGNING_SECRET" in refused.stderr
    # explicitly insecure: it starts, and answers without a key; two uvicorn workers whose
    # counters add up on /metrics, served on its own port only
    mport = free_port()
    proc = ApiProc(module_redis.url, argv=[sys.executable, "-m", "latentd.cli", "serve",
                                           "--insecure-no-auth", "--port", str(port), "--workers", "2"],
                   port=port, keys_file=str(tmp_path / "none.json"), metrics_port=mport)
    proc.start()
    try:
        for _ in range(6):                      # fresh connections: spread over both workers
            with httpx.Client(base_url=proc.url) as c:
                assert c.get("/v1/models").status_code == 200
        with httpx.Client(base_url=proc.url) as c:
            assert c.get("/metrics").status_code == 404
        separate = httpx.get(f"http://127.0.0.1:{mport}/metrics")
        assert separate.status_code == 200 and "latentd_queue_depth" in separate.text
        assert 'latentd_api_requests_total{method="GET",route="/v1/models",status="200"} 6.0' in separate.text
    finally:
        proc.stop()


def test_insecure_settings_are_refused_outside_dev_only(tmp_path):
    from latentd.app.main import InsecureConfig, config_problems, create_app, key_store
    from latentd.app.state import app_state
    from latentd.config.settings import Settings

    none = str(tmp_path / "none.json")
    digest = hashlib.sha256(ALICE.encode()).hexdigest()
    prod = dict(keys_file=none, signing_secret=SECRET, api_keys=f"alice:{digest}")
    assert config_problems(Settings(**prod)) == []
    for bad in ({"api_keys": ""}, {"signing_secret": ""}, {"signing_secret": "short"},
                {"signing_secret": signing.DEV_SECRET}):
        with pytest.raises(InsecureConfig):
            create_app(Settings(**{**prod, **bad}))
    assert key_store(Settings(**{**prod, "api_keys": "", "auth": "off"})) is None   # explicit
    # dev: no keys -> auth off; keys configured -> auth on; the dev secret is accepted
    assert key_store(Settings(env="dev", keys_file=none)) is None
    assert key_store(Settings(env="dev", keys_file=none, api_keys=f"alice:{digest}")).owner(ALICE) == "alice"
    assert app_state(create_app(Settings(env="dev", keys_file=none))).keys is None
