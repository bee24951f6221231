"""Every request field reaches every surface the declaration (jobs/request.py) names, and no
surface carries a field the declaration does not give it: the API's JSON and multipart schemas
(as /openapi.json serves them), JobSpec, `latentd generate` (local flags and the --server body),
the playground form, and docs/CONTRACTS.md's JobSpec list. Torch-free, no services."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from latentd.jobs.request import BY_NAME, FIELDS, SURFACES, on

ROOT = Path(__file__).resolve().parent.parent
ENVELOPE = {"version", "owner", "timeout_s"}       # JobSpec's own, not request fields


def names(surface: str) -> set[str]:
    return {f.name for f in on(surface)}


def test_the_declaration_is_consistent():
    assert len(BY_NAME) == len(FIELDS)
    for f in FIELDS:
        assert f.on and f.on <= set(SURFACES), f.name
        assert f.help, f.name
        for target in f.spec_as or ():
            assert "spec" in BY_NAME[target].on, (f.name, target)
        # a field a caller sends that a job needs reaches the job, as itself or resolved
        if f.on & {"generation", "job", "edit", "cli"} and f.name not in (
                "response_format", "user", "background", "style", "stream", "partial_images", "callback_url"):
            assert "spec" in f.on or f.spec_as, f.name


def _openapi():
    from latentd.app.schemas import EDIT_BODY, GENERATION_BODY, JOB_BODY

    def props(body, media):
        return set(body["requestBody"]["content"][media]["schema"]["properties"])
    return {"generation": props(GENERATION_BODY, "application/json"),
            "job": props(JOB_BODY, "application/json"),
            "edit": props(EDIT_BODY, "multipart/form-data"),
            "job-multipart": props(JOB_BODY, "multipart/form-data")}


def test_api_schemas_carry_exactly_the_declared_fields():
    got = _openapi()
    assert got["generation"] == names("generation")
    assert got["job"] == names("job")
    assert got["edit"] == got["job-multipart"] == names("edit")


def test_served_openapi_uses_the_derived_schemas():
    from latentd.app.schemas import EDIT_BODY, GENERATION_BODY, JOB_BODY
    from latentd.app.routes.edits import router as edits
    from latentd.app.routes.images import router as images
    from latentd.app.routes.jobs import router as jobs

    extras = {r.path: r.openapi_extra for rt in (images, edits, jobs) for r in rt.routes
              if "POST" in getattr(r, "methods", ())}
    # the routes add headers (Idempotency-Key) beside the derived bodies; the bodies are the same objects
    for path, body in (("/v1/images/generations", GENERATION_BODY), ("/v1/images/edits", EDIT_BODY),
                       ("/v1/jobs", JOB_BODY)):
        assert extras[path]["requestBody"] is body["requestBody"], path


def test_job_spec_fields_are_the_declared_ones():
    from latentd.jobs.spec import JobSpec

    assert set(JobSpec.model_fields) - ENVELOPE == names("spec")


def test_cli_has_a_flag_for_every_cli_field():
    from latentd.cmd_generate import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    dests = {a.dest for a in p._actions}
    assert names("cli") <= dests
    for f in on("cli"):
        if f.flag != "":
            assert f.cli_flag in p._option_string_actions, f.cli_flag


def test_server_body_carries_every_cli_field(tmp_path):
    """`latentd generate --server` sends every request flag given (nothing dropped), each under
    a name the /v1/jobs body accepts."""
    from latentd.app.schemas import JobRequest
    from latentd.cmd_generate import add_arguments
    from latentd.cmd_remote import request_body

    img = tmp_path / "i.png"
    img.write_bytes(b"\x89PNG not really")
    given = {"prompt": "a cat", "negative_prompt": "dog", "size": "64x64", "steps": 4,
             "guidance_scale": 2.5, "sampler": "ddim", "karras": True, "eta": 0.5, "seed": 3,
             "image": str(img), "mask": str(img), "strength": 0.5, "classifier_guidance": "color=red",
             "model": "shapes", "priority": "high", "deadline_s": 60, "loras": "star:0.5",
             "timestep_spacing": "trailing", "cache_interval": 3}
    assert set(given) == names("cli")           # a new cli field must be given a value here
    argv = []
    for f in on("cli"):
        if f.flag == "":
            continue
        argv += [f.cli_flag] if f.type is bool else [f.cli_flag, str(given[f.name])]
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(argv + ["--classifier-scale", "2", "--out", "x.png", given["prompt"]])
    body = request_body(args)
    assert set(body) == names("cli") <= set(JobRequest.model_fields)
    assert body["classifier_guidance"] == {"color": "red", "scale": 2.0}
    assert body["loras"] == [{"name": "star", "scale": 0.5}]
    assert body["image"] and body["image"] != str(img)          # the file's bytes, in base64
    JobRequest.model_validate_json(json.dumps(body))            # the server's strict model takes it


def _playground_fields() -> tuple[set[str], set[str]]:
    js = (ROOT / "app" / "static" / "app.js").read_text()
    html = (ROOT / "app" / "static" / "index.html").read_text()
    sent = set(re.findall(r'"([a-z_]+)"', re.search(r"const FIELDS = \[(.*?)\];", js).group(1)))
    form = re.search(r'<form id="form".*?</form>', html, re.S).group(0)
    inputs = set(re.findall(r'\bname="([a-z_]+)"', form)) - {"key"}     # the API key is a header
    return sent, inputs


def test_playground_sends_the_declared_fields():
    sent, inputs = _playground_fields()
    assert sent == inputs == names("playground")
    js = (ROOT / "app" / "static" / "app.js").read_text()
    ints = set(re.findall(r'"([a-z_]+)"', re.search(r"const INTS = new Set\(\[(.*?)\]\)", js).group(1)))
    assert ints == {f.name for f in on("playground") if f.type is int}


def test_contracts_doc_lists_the_job_spec_fields():
    doc = (ROOT / "docs" / "CONTRACTS.md").read_text()
    m = re.search(r"queue as JSON: `(.*?)`", doc, re.S)
    listed = {re.sub(r"\s*\(.*\)|=.*", "", x).strip() for x in m.group(1).split(",")}
    from latentd.jobs.spec import JobSpec
    assert listed == set(JobSpec.model_fields)


@pytest.mark.parametrize("surface", ["generation", "job", "edit"])
def test_api_help_and_defaults_come_from_the_declaration(surface):
    from latentd.app.schemas import ImagesEditForm, ImagesGenerationRequest, JobRequest

    cls = {"generation": ImagesGenerationRequest, "job": JobRequest, "edit": ImagesEditForm}[surface]
    for name, fi in cls.model_fields.items():
        assert fi.description.startswith(BY_NAME[name].help), name
