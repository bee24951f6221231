"""Hostile and malformed input: every bad request gets a 4xx whose error body names the field,
and nothing is enqueued (queue length and job records unchanged)."""
import json

import pytest

from devkit.api_proc import ALICE
from latentd.jobs import keys

OK = {"prompt": "a red circle"}
# (name, body (dict -> JSON; str/bytes -> raw), expected status, field named in the error)
BAD = [
    ("missing prompt", {}, 422, "prompt"),
    ("empty prompt", {"prompt": ""}, 422, "prompt"),
    ("prompt not a string", {"prompt": 5}, 422, "prompt"),
    ("prompt too long", {"prompt": "x" * 3000}, 422, "prompt"),
    ("prompt with NUL", {"prompt": "a\x00b"}, 422, "prompt"),
    ("negative_prompt not a string", {**OK, "negative_prompt": ["x"]}, 422, "negative_prompt"),
    ("n zero", {**OK, "n": 0}, 422, "n"),
    ("n huge", {**OK, "n": 10**6}, 422, "n"),
    ("n over the deployment cap", {**OK, "n": 5}, 422, "n"),
    ("n as a string", {**OK, "n": "2"}, 422, "n"),
    ("n as a float", {**OK, "n": 2.5}, 422, "n"),
    ("size not WxH", {**OK, "size": "big"}, 422, "size"),
    ("size as a number", {**OK, "size": 64}, 422, "size"),
    ("size huge", {**OK, "size": "100000x100000"}, 422, "size"),
    ("size over max side", {**OK, "size": "4096x64"}, 422, "size"),
    ("size not a multiple", {**OK, "size": "65x64"}, 422, "size"),
    ("size over the pixel cap", {**OK, "size": "256x256"}, 422, "size"),
    ("size negative", {**OK, "size": "-64x64"}, 422, "size"),
    ("steps zero", {**OK, "steps": 0}, 422, "steps"),
    ("steps huge", {**OK, "steps": 10**9}, 422, "steps"),
    ("steps over the model max", {**OK, "steps": 151}, 422, "steps"),
    ("guidance NaN", '{"prompt": "x", "guidance_scale": NaN}', 422, "guidance_scale"),
    ("guidance Infinity", '{"prompt": "x", "guidance_scale": Infinity}', 422, "guidance_scale"),
    ("guidance negative", {**OK, "guidance_scale": -1}, 422, "guidance_scale"),
    ("guidance over the model max", {**OK, "guidance_scale": 50}, 422, "guidance_scale"),
    ("guidance as a string", {**OK, "guidance_scale": "7"}, 422, "guidance_scale"),
    ("unknown sampler", {**OK, "sampler": "plms"}, 422, "sampler"),
    ("karras not a bool", {**OK, "karras": "yes"}, 422, "karras"),
    ("karras with ddim", {**OK, "sampler": "ddim", "karras": True}, 422, "karras"),
    ("seed negative", {**OK, "seed": -1}, 422, "seed"),
    ("seed huge", {**OK, "seed": 2**70}, 422, "seed"),
    ("seed + n overflows", {**OK, "seed": 2**63 - 1, "n": 2}, 422, "seed"),
    ("seed as a string", {**OK, "seed": "42"}, 422, "seed"),
    ("unknown model", {**OK, "model": "dall-e-3"}, 422, "model"),
    ("bad response_format", {**OK, "response_format": "png"}, 422, "response_format"),
    ("unknown field", {**OK, "foo": 1}, 422, "foo"),
    ("user not a string", {**OK, "user": 123}, 422, "user"),
    ("body is a list", [OK], 422, "body"),
    ("body is null", "null", 422, "body"),
    ("malformed JSON", '{"prompt": ', 400, "body"),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}', 400, "body"),
    ("100 KB body", {"prompt": "x" * 100_000}, 413, "body"),
]


def _post(client, path, body):
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    return client.post(path, content=body, headers={"Content-Type": "application/json"})


def _queued(r) -> tuple[int, int]:
    return r.llen(keys.rq_queue("latentd")), len(r.keys("latentd:job:*"))


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/images/generations"])
def test_bad_requests_name_the_field_and_enqueue_nothing(api, module_redis, path):
    r = module_redis.client()
    before = _queued(r)
    failures = []
    with api.client(ALICE) as c:
        for name, body, status, field in BAD:
            resp = _post(c, path, body)
            err = resp.json().get("error", {}) if resp.headers.get("content-type", "").startswith(
                "application/json") else {}
            if resp.status_code != status or err.get("field") != field or field not in err.get("message", "") + field:
                failures.append(f"{name}: {resp.status_code} {resp.text[:200]}")
            assert "Traceback" not in resp.text
    assert not failures, "\n".join(failures)
    assert _queued(r) == before, "a rejected request enqueued something"


def test_errors_say_the_allowed_range(api):
    with api.client(ALICE) as c:
        e = c.post("/v1/jobs", json={**OK, "steps": 151}).json()["error"]
        assert e["allowed"] == {"min": 1, "max": 150} and "150" in e["message"]
        e = c.post("/v1/jobs", json={**OK, "size": "256x256"}).json()["error"]
        assert e["allowed"]["max_pixels"] == 16384 and e["allowed"]["multiple_of"] == 16
        e = c.post("/v1/jobs", json={**OK, "sampler": "plms"}).json()["error"]
        assert "dpmpp_2m" in e["allowed"]
        e = c.post("/v1/jobs", json={"prompt": "x" * 100_000}).json()["error"]
        assert e["allowed"] == {"max_bytes": 65536}


def test_a_good_request_is_admitted_with_defaults(api, module_redis):
    r = module_redis.client()
    n0 = r.llen(keys.rq_queue("latentd"))
    with api.client(ALICE) as c:
        resp = c.post("/v1/jobs", json={**OK, "size": "64x128", "n": 2, "seed": 7})
        assert resp.status_code == 202, resp.text
        job = c.get(f"/v1/jobs/{resp.json()['id']}").json()
    assert r.llen(keys.rq_queue("latentd")) == n0 + 1
    assert job["status"] == "queued" and job["queue_position"] is not None
    p = job["params"]
    assert (p["width"], p["height"], p["n"], p["seed"], p["steps"]) == (64, 128, 2, 7, 20)


def test_bad_path_parameters_are_4xx(api):
    with api.client(ALICE) as c:
        for path in ("/v1/jobs/..%2F..%2Fetc%2Fpasswd", "/v1/jobs/" + "f" * 32, "/v1/jobs/%00",
                     "/v1/jobs/" + "a" * 5000):
            assert c.get(path).status_code == 404, path
            assert c.delete(path).status_code == 404, path
        resp = c.get("/v1/jobs/" + "f" * 32 + "/images/abc")
        assert resp.status_code == 422 and resp.json()["error"]["field"] == "k"
        assert c.get("/v1/jobs/" + "f" * 32 + "/images/-1").status_code == 404
