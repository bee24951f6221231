"""Hostile input: a table of bad requests against a real uvicorn + real redis-server.

Every case must get a 4xx whose JSON error body names the field (never a 500, never a traceback),
and the whole table must leave the queue exactly as it was (nothing enqueued, no job record).
tests/test_api_validation.py has the basic 422 table; this one adds what an attacker would try:
raw NaN/Infinity/1e309 tokens, lone surrogates, invalid UTF-8, 100 KB prompts (under a raised
body cap, so the prompt rule itself answers), oversized and chunked bodies, deep nesting, odd
content types, and path-like, huge, encoded and unicode job ids on every route that takes one.
"""
from __future__ import annotations

import http.client
import json

import pytest

from devkit.api_proc import ALICE, KEYS, ApiProc
from latentd.jobs import keys

BODY_CAP = 262144                  # raised so a 100 KB prompt reaches the prompt-length rule
OK = {"prompt": "a red circle"}
J = "/v1/jobs"


def raw(s: str) -> bytes:
    return s.encode()


# (name, method, path, body: dict/list -> JSON, bytes -> raw, None -> no body,
#  extra headers, expected status, field named in the error)
CASES = [
    # --- sizes, steps, n --------------------------------------------------------------------
    ("size 99999x99999", "POST", J, {**OK, "size": "99999x99999"}, {}, 422, "size"),
    ("size 0x0", "POST", J, {**OK, "size": "0x0"}, {}, 422, "size"),
    ("size three dims", "POST", J, {**OK, "size": "64x64x64"}, {}, 422, "size"),
    ("size unicode digits", "POST", J, {**OK, "size": "\uff16\uff14x\uff16\uff14"}, {}, 422, "size"),
    ("size as a list", "POST", J, {**OK, "size": [64, 64]}, {}, 422, "size"),
    ("steps 2**64", "POST", J, {**OK, "steps": 2**64}, {}, 422, "steps"),
    ("steps negative", "POST", J, {**OK, "steps": -5}, {}, 422, "steps"),
    ("steps as a float", "POST", J, {**OK, "steps": 10.0}, {}, 422, "steps"),
    ("steps as a bool", "POST", J, {**OK, "steps": True}, {}, 422, "steps"),
    ("steps NaN", "POST", J, raw('{"prompt": "x", "steps": NaN}'), {}, 422, "steps"),
    ("n 2**63", "POST", J, {**OK, "n": 2**63}, {}, 422, "n"),
    ("n negative", "POST", J, {**OK, "n": -1}, {}, 422, "n"),
    ("n null", "POST", J, {**OK, "n": None}, {}, 422, "n"),
    ("n Infinity", "POST", J, raw('{"prompt": "x", "n": Infinity}'), {}, 422, "n"),
    # --- guidance -----------------------------------------------------------------------------
    ("guidance NaN", "POST", J, raw('{"prompt": "x", "guidance_scale": NaN}'), {}, 422, "guidance_scale"),
    ("guidance Infinity", "POST", J, raw('{"prompt": "x", "guidance_scale": Infinity}'), {}, 422,
     "guidance_scale"),
    ("guidance -Infinity", "POST", J, raw('{"prompt": "x", "guidance_scale": -Infinity}'), {}, 422,
     "guidance_scale"),
    ("guidance 1e309 (overflows to inf)", "POST", J, raw('{"prompt": "x", "guidance_scale": 1e309}'),
     {}, 422, "guidance_scale"),
    ("guidance as a list", "POST", J, {**OK, "guidance_scale": [7.5]}, {}, 422, "guidance_scale"),
    # --- prompts and text ---------------------------------------------------------------------
    ("100 KB prompt", "POST", J, {"prompt": "x" * 100_000}, {}, 422, "prompt"),
    ("100 KB negative prompt", "POST", J, {**OK, "negative_prompt": "y" * 100_000}, {}, 422,
     "negative_prompt"),
    ("prompt as an object", "POST", J, {"prompt": {"text": "x"}}, {}, 422, "prompt"),
    # a lone surrogate is valid JSON but not text: refused as an unreadable body or by its field
    ("prompt lone surrogate", "POST", J, raw('{"prompt": "a \\ud800 b"}'), {}, (400, 422), ("body", "prompt")),
    ("negative prompt lone surrogate", "POST", J, raw('{"prompt": "a", "negative_prompt": "\\udfff"}'),
     {}, (400, 422), ("body", "negative_prompt")),
    ("user lone surrogate", "POST", J, raw('{"prompt": "a", "user": "\\ud83d"}'), {}, (400, 422), ("body", "user")),
    ("invalid UTF-8 in the prompt", "POST", J, b'{"prompt": "caf\xc3\x28"}', {}, 400, "body"),
    ("invalid UTF-8 in a key", "POST", J, b'{"pr\xffompt": "x"}', {}, 400, "body"),
    ("latin-1 body", "POST", J, '{"prompt": "caf\u00e9"}'.encode("latin-1"), {}, 400, "body"),
    # --- seeds --------------------------------------------------------------------------------
    ("seed 2**63", "POST", J, {**OK, "seed": 2**63}, {}, 422, "seed"),
    ("seed 2**64", "POST", J, {**OK, "seed": 2**64}, {}, 422, "seed"),
    ("seed -2**63", "POST", J, {**OK, "seed": -2**63}, {}, 422, "seed"),
    ("seed as a float", "POST", J, {**OK, "seed": 1.5}, {}, 422, "seed"),
    ("seed 1e20", "POST", J, raw('{"prompt": "x", "seed": 1e20}'), {}, 422, "seed"),
    # --- sampler and model --------------------------------------------------------------------
    ("sampler empty", "POST", J, {**OK, "sampler": ""}, {}, 422, "sampler"),
    ("sampler path-like", "POST", J, {**OK, "sampler": "../../etc/passwd"}, {}, 422, "sampler"),
    ("sampler unicode", "POST", J, {**OK, "sampler": "\u0435uler"}, {}, 422, "sampler"),   # Cyrillic e
    ("model path-like", "POST", J, {**OK, "model": "../../../etc/passwd"}, {}, 422, "model"),
    ("model empty", "POST", J, {**OK, "model": ""}, {}, 422, "model"),
    ("model a hub id", "POST", J, {**OK, "model": "stabilityai/stable-diffusion-2-1"}, {}, 422, "model"),
    # --- bodies -------------------------------------------------------------------------------
    ("body over the cap", "POST", J, {"prompt": "x" * (BODY_CAP + 10)}, {}, 413, "body"),
    ("chunked body over the cap", "POST", J, "chunked", {}, 413, "body"),
    ("empty body", "POST", J, b"", {}, 422, "body"),
    ("body a JSON string", "POST", J, raw('"a red circle"'), {}, 422, "body"),
    ("body a number", "POST", J, raw("42"), {}, 422, "body"),
    ("truncated JSON", "POST", J, raw('{"prompt": "x", "n": '), {}, 400, "body"),
    ("trailing garbage", "POST", J, raw('{"prompt": "x"} {"prompt": "y"}'), {}, 400, "body"),
    ("deeply nested JSON", "POST", J, raw('{"prompt": ' + "[" * 50_000 + "]" * 50_000 + "}"), {},
     (400, 422), ("body", "prompt")),
    ("duplicate keys, last one bad", "POST", J, raw('{"prompt": "x", "prompt": 5}'), {}, 422, "prompt"),
    ("prototype-pollution key", "POST", J, {**OK, "__proto__": {"admin": True}}, {}, 422, "__proto__"),
    ("text/plain non-JSON body", "POST", J, b"draw a cat", {"Content-Type": "text/plain"}, (400, 422), "body"),
    ("form body", "POST", J, b"prompt=x", {"Content-Type": "application/x-www-form-urlencoded"}, (400, 422),
     "body"),
    ("multipart body", "POST", J, b"--b\r\nContent-Disposition: form-data; name=prompt\r\n\r\nx\r\n--b--\r\n",
     {"Content-Type": "multipart/form-data; boundary=b"}, (400, 422), ("body", "image")),  # an edit without its image
    ("sync endpoint NaN guidance", "POST", "/v1/images/generations",
     raw('{"prompt": "x", "guidance_scale": NaN}'), {}, 422, "guidance_scale"),
    ("sync endpoint seed 2**63", "POST", "/v1/images/generations", {**OK, "seed": 2**63}, {}, 422, "seed"),
]

# Bogus and path-like job ids: every route that takes an id. Paths are sent byte for byte
# (http.client does not normalise "..").
IDS = {
    "path traversal": "../../etc/passwd",
    "encoded slashes": "..%2F..%2Fetc%2Fpasswd",
    "double-encoded slashes": "..%252F..%252Fetc%252Fpasswd",
    "encoded dots only": "%2e%2e",
    "10 KB id": "a" * 10_240,
    "unicode id": "%E2%98%83%F0%9F%92%A5",
    "invalid UTF-8 escapes": "%FF%FE%FD",
    "NUL byte": "abc%00def",
    "CRLF": "abc%0d%0aSet-Cookie:%20x=1",
    "uppercase hex": "F" * 32,
    "hex with a dot": "f" * 31 + ".",
    "redis glob": "*",
    "redis key syntax": "x%20latentd:job:*",
}


def _id_cases():
    out = []
    for name, jid in IDS.items():
        for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/images/0")):
            out.append((f"{method} {suffix or 'job'} {name}", method, f"{J}/{jid}{suffix}"))
    # image index and signed-URL parameters
    good = "f" * 32
    out += [("image k huge", "GET", f"{J}/{good}/images/{2**70}"),
            ("image k negative", "GET", f"{J}/{good}/images/-1")]
    return out


def _send(url_port: int, method: str, path: str, body, headers: dict, key: str = ALICE):
    """One raw HTTP/1.1 request; returns (status, headers dict, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", url_port, timeout=30)
    try:
        h = {**({"Authorization": f"Bearer {key}"} if key else {}), **headers}
        if body == "chunked":
            conn.putrequest(method, path, skip_accept_encoding=True)
            for k, v in {**h, "Content-Type": "application/json", "Transfer-Encoding": "chunked"}.items():
                conn.putheader(k, v)
            conn.endheaders()
            chunk = b"x" * 65536
            sent = 0
            try:
                conn.send(b'c\r\n{"prompt": "\r\n')
                while sent < BODY_CAP * 2:
                    conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    sent += len(chunk)
                conn.send(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass            # the server answered 413 and closed early: fine
        else:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            if body is not None:
                h.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def hostile_api(module_redis, tiny_model):
    proc = ApiProc(module_redis.url, api_keys=KEYS, model=tiny_model, rate_limit_per_s=0,
                   max_body_bytes=BODY_CAP).start()
    try:
        yield proc
    finally:
        proc.stop()


def _queue_state(r):
    return (r.llen(keys.rq_queue("latentd")), len(r.keys("latentd:job:*")), len(r.keys("rq:job:*")))


def _error(status, headers, body) -> dict:
    assert b"Traceback" not in body and ALICE.encode() not in body
    if not headers.get("content-type", "").startswith("application/json"):
        return {}
    try:
        return json.loads(body).get("error") or {}
    except (ValueError, AttributeError):
        return {}


def test_hostile_bodies_are_4xx_naming_the_field(hostile_api, module_redis):
    assert len(CASES) >= 30
    r = module_redis.client()
    before = _queue_state(r)
    port = hostile_api.port
    failures = []
    for name, method, path, body, headers, want, field in CASES:
        status, hdrs, text = _send(port, method, path, body, headers)
        err = _error(status, hdrs, text)
        wants = want if isinstance(want, tuple) else (want,)
        fields = field if isinstance(field, tuple) else (field,)
        if status not in wants or err.get("field") not in fields:
            failures.append(f"{name}: {status} {text[:300]!r}")
    assert not failures, f"{len(failures)} of {len(CASES)} cases failed:\n" + "\n".join(failures)
    assert _queue_state(r) == before, "a rejected request enqueued something"
    # and the API is still healthy and admits a good request afterwards
    status, _, _ = _send(port, "POST", J, {**OK, "size": "64x64"}, {})
    assert status == 202


def test_bogus_job_ids_are_404_on_every_route(hostile_api, module_redis):
    r = module_redis.client()
    before = _queue_state(r)
    failures = []
    for name, method, path in _id_cases():
        status, hdrs, text = _send(hostile_api.port, method, path, None, {})
        err = _error(status, hdrs, text)
        # a path that still matches a route names the parameter; one that no longer matches any
        # route (a decoded "/" inside the id) names the path
        ok_field = err.get("field") in ("job_id", "k", "path")
        if status != 404 or not ok_field:
            failures.append(f"{name}: {status} {text[:200]!r}")
    assert not failures, "\n".join(failures)
    assert _queue_state(r) == before
    assert not r.keys("*passwd*") and not r.keys("*\u2603*")


def test_bad_signed_url_parameters_are_4xx(hostile_api):
    good = "f" * 32
    for query, want, field in ((f"o={'a' * 10_000}&exp=1&sig=x", 422, "o"),
                               (f"o=alice&exp={'9' * 20}&sig=x", 403, "sig"),
                               ("o=alice&exp=-1&sig=x", 403, "sig"),
                               ("o=..%2F..&exp=99999999999&sig=" + "A" * 101, 422, "sig"),
                               ("o=%FF&exp=99999999999&sig=%00", 403, "sig")):
        status, hdrs, text = _send(hostile_api.port, "GET", f"{J}/{good}/images/0?{query}", None, {},
                                   key="")
        err = _error(status, hdrs, text)
        assert (status, err.get("field")) == (want, field), (query[:60], status, text[:200])


def test_hostile_auth_headers_are_401(hostile_api):
    for value in ("Bearer " + "k" * 10_000, "Bearer \u00ff\u00fe", "Bearer  " + ALICE + " x",
                  "bearer" + ALICE, "Bearer " + ALICE.upper()):
        try:
            status, hdrs, text = _send(hostile_api.port, "GET", "/v1/models", None,
                                       {"Authorization": value.encode("latin-1").decode("latin-1")})
        except UnicodeEncodeError:
            continue
        assert status == 401, (value[:40], status, text[:200])
        assert _error(status, hdrs, text).get("field") == "Authorization"


def test_allowed_ranges_are_json_not_python_reprs(hostile_api):
    """The range in `allowed` is data a client can read ({"min": .., "max": ..}), for the bounds
    the schema checks (n, user) as for those the model checks (steps)."""
    for body, field, want in (({**OK, "n": 0}, "n", {"min": 1, "max": 16}),
                              ({**OK, "user": "u" * 300}, "user", {"max": 256}),
                              ({**OK, "steps": 0}, "steps", None)):
        status, hdrs, text = _send(hostile_api.port, "POST", J, body, {})
        err = _error(status, hdrs, text)
        assert status == 422 and err["field"] == field, text
        assert isinstance(err["allowed"], dict), err
        if want:
            assert err["allowed"] == want, err
        assert "None" not in json.dumps(err["allowed"])
