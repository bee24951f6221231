"""POST /v1/images/edits and edits on POST /v1/jobs, against a real uvicorn + redis-server (no
worker): every bad upload or field is a 4xx naming the field with nothing queued; a good edit is
queued with its init image stored next to the job (never in the spec, the RQ job, the record the
owner reads, or the logs), gone when the job ends; another key sees 404."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from devkit.api_proc import ALICE, BOB
from latentd.jobs import keys


def png(size=(64, 64), mode="RGB", color=(200, 30, 30), **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def rgba_mask(size=(64, 64)) -> bytes:
    """OpenAI-style mask: opaque everywhere except a transparent (edit) square."""
    im = Image.new("RGBA", size, (0, 0, 0, 255))
    im.paste((0, 0, 0, 0), (16, 16, 48, 48))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def huge_header_png(w=100_000, h=100_000) -> bytes:
    """A PNG whose header claims w x h pixels (a decompression bomb's header), tiny on the wire."""
    raw = png((1, 1))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


GOOD = {"prompt": "a blue square"}
IMG = png()
# (name, form fields, files, field named in the 4xx)
BAD = [
    ("missing image", GOOD, {}, "image"),
    ("missing prompt", {}, {"image": IMG}, "prompt"),
    ("not an image", GOOD, {"image": b"hello, not an image"}, "image"),
    ("empty image", GOOD, {"image": b""}, "image"),
    ("truncated image", GOOD, {"image": IMG[: len(IMG) // 2]}, "image"),
    ("decompression bomb", GOOD, {"image": huge_header_png()}, "image"),
    ("image over the pixel cap", GOOD, {"image": png((5000, 4000), "L", 0)}, "image"),
    ("image not a model size", GOOD, {"image": png((72, 64))}, "image"),
    ("image over the model's max", GOOD, {"image": png((256, 256))}, "image"),
    ("mask of another size", GOOD, {"image": IMG, "mask": rgba_mask((32, 32))}, "mask"),
    ("mask not an image", GOOD, {"image": IMG, "mask": b"GIF89a..."}, "mask"),
    ("strength zero", {**GOOD, "strength": "0"}, {"image": IMG}, "strength"),
    ("strength over 1", {**GOOD, "strength": "1.5"}, {"image": IMG}, "strength"),
    ("strength not a number", {**GOOD, "strength": "lots"}, {"image": IMG}, "strength"),
    ("strength too small for steps", {**GOOD, "strength": "0.01", "steps": "10"}, {"image": IMG}, "strength"),
    ("two images", GOOD, [("image[]", IMG), ("image[]", IMG)], "image"),
    ("size not WxH", {**GOOD, "size": "big"}, {"image": IMG}, "size"),
    ("n over the cap", {**GOOD, "n": "9"}, {"image": IMG}, "n"),
    ("unknown field", {**GOOD, "foo": "1"}, {"image": IMG}, "foo"),
    ("bad output_format", {**GOOD, "output_format": "gif"}, {"image": IMG}, "output_format"),
    ("bad output_compression", {**GOOD, "output_compression": "101"}, {"image": IMG}, "output_compression"),
    ("unknown model", {**GOOD, "model": "dall-e-2"}, {"image": IMG}, "model"),
]


def multipart(data: dict, files) -> list:
    """httpx `files` for a multipart body: text fields without a filename, then the files (so
    the body is multipart even with no file)."""
    items = files if isinstance(files, list) else list(files.items())
    return ([(k, (None, v)) for k, v in data.items()]
            + [(k, (f"{k}.png", v, "image/png")) for k, v in items])


def _queued(r) -> tuple[int, int, int]:
    return r.llen(keys.rq_queue("latentd")), len(r.keys("latentd:job:*")), len(r.keys("latentd:init:*"))


@pytest.mark.parametrize("path", ["/v1/images/edits", "/v1/jobs"])
def test_bad_edits_name_the_field_and_queue_nothing(api, module_redis, path):
    r = module_redis.client()
    before = _queued(r)
    failures = []
    with api.client(ALICE) as c:
        for name, data, files, field in BAD:
            if path == "/v1/jobs" and not files:
                continue      # a multipart job without an image: see the JSON case below
            resp = c.post(path, files=multipart(data, files))
            err = resp.json().get("error", {}) if resp.headers.get("content-type", "").startswith(
                "application/json") else {}
            if not 400 <= resp.status_code < 500 or err.get("field") != field:
                failures.append(f"{name}: {resp.status_code} {resp.text[:200]}")
            assert "Traceback" not in resp.text
    assert not failures, "\n".join(failures)
    assert _queued(r) == before, "a rejected edit queued or stored something"


def test_json_job_edits_are_checked_too(api, module_redis):
    r = module_redis.client()
    before = _queued(r)
    with api.client(ALICE) as c:
        cases = [({"prompt": "x", "image": "not base64!"}, "image"),
                 ({"prompt": "x", "image": base64.b64encode(b"not an image").decode()}, "image"),
                 ({"prompt": "x", "mask": base64.b64encode(IMG).decode()}, "image"),
                 ({"prompt": "x", "strength": 0.5}, "strength"),
                 ({"prompt": "x", "image": base64.b64encode(IMG).decode(), "strength": 2}, "strength")]
        for body, field in cases:
            resp = c.post("/v1/jobs", json=body)
            assert resp.status_code == 422 and resp.json()["error"]["field"] == field, resp.text
        resp = c.post("/v1/images/edits", json={"prompt": "x"})
        assert resp.status_code == 400 and resp.json()["error"]["field"] == "body"
        # a text-only body keeps the small bound even on the route that takes images
        resp = c.post("/v1/jobs", json={"prompt": "x" * 100_000})
        assert resp.status_code == 413 and resp.json()["error"]["allowed"] == {"max_bytes": 65536}
    assert _queued(r) == before


def test_an_edit_job_stores_its_image_only_while_it_lives(api, module_redis):
    r = module_redis.client()
    with api.client(ALICE) as alice, api.client(BOB) as bob:
        resp = alice.post("/v1/jobs", data={"prompt": "a blue square", "steps": "10", "seed": "5",
                                            "output_format": "webp", "output_compression": "70"},
                          files=[("image", ("i.png", IMG, "image/png")), ("mask", ("m.png", rgba_mask(), "image/png"))])
        assert resp.status_code == 202, resp.text
        jid = resp.json()["id"]
        job = alice.get(f"/v1/jobs/{jid}").json()
        assert job["kind"] == "inpaint" and job["status"] == "queued"
        p = job["params"]
        assert (p["kind"], p["strength"], p["width"], p["height"], p["output_format"]) == ("inpaint", 1.0, 64, 64, "webp")
        assert "image" not in p and "mask" not in p
        stored = r.hgetall(keys.init_image(jid))
        assert set(stored) == {b"image", b"mask"} and r.ttl(keys.init_image(jid)) > 0
        mask = Image.open(io.BytesIO(stored[b"mask"]))
        assert mask.mode == "L" and mask.getpixel((32, 32)) == 255 and mask.getpixel((2, 2)) == 0
        blob = b"".join(v if isinstance(v, bytes) else b"" for v in r.hgetall(keys.job(jid)).values())
        blob += b"".join(r.hgetall(keys.rq_job(jid)).values())
        assert stored[b"image"] not in blob and IMG not in blob
        assert bob.get(f"/v1/jobs/{jid}").status_code == 404
        assert bob.delete(f"/v1/jobs/{jid}").status_code == 404 and r.exists(keys.init_image(jid))
        # JSON with base64 works the same; img2img without a mask
        b64 = alice.post("/v1/jobs", json={"prompt": "x", "image": "data:image/png;base64," +
                                           base64.b64encode(IMG).decode(), "strength": 0.5, "steps": 10})
        assert b64.status_code == 202, b64.text
        j2 = alice.get(f"/v1/jobs/{b64.json()['id']}").json()
        assert j2["kind"] == "img2img" and j2["params"]["strength"] == 0.5
        assert j2["progress"]["total"] == 5                  # an edit runs int(steps x strength) steps
        for j in (jid, j2["id"]):
            assert alice.delete(f"/v1/jobs/{j}").json()["status"] == "canceled"
            assert not r.exists(keys.init_image(j)), "the init image outlived its job"
    assert IMG not in api.output().encode(errors="replace")


def test_openapi_documents_the_edit_form(api):
    with api.client(ALICE) as c:
        spec = c.get("/openapi.json").json()
    body = spec["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "mask", "prompt", "strength", "output_format"} <= set(body["properties"])
    assert "image" in body["required"]
