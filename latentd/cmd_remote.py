"""`latentd generate --server URL [--key K]`: the same command against a running latentd service.

Submits POST /v1/jobs, follows GET /v1/jobs/{id}/events for the progress bar (resuming with
Last-Event-ID if the connection drops), and writes the stored image. Standard library HTTP only:
the CLI needs nothing the service does not. Ctrl-C cancels the job on the server.
"""
from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urljoin

ENGINE_ONLY = (("no_safety", "--no-safety"), ("dtype", "--dtype"))


class RemoteError(Exception):
    def __init__(self, status: int, error: dict):
        super().__init__(error.get("message", f"HTTP {status}"))
        self.status, self.error = status, error


class Remote:
    def __init__(self, server: str, key: str | None, timeout: float = 30.0):
        self.base = server.rstrip("/") + "/"
        self.key, self.timeout = key, timeout

    def request(self, method: str, path: str, body: dict | None = None, headers: dict | None = None,
                timeout: float | None = None):
        h = {"Accept": "application/json", **(headers or {})}
        if self.key:
            h["Authorization"] = f"Bearer {self.key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        req = urllib.request.Request(urljoin(self.base, path.lstrip("/")), data=data, method=method, headers=h)
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read() or b"{}").get("error") or {}
            except ValueError:
                err = {}
            raise RemoteError(e.code, err or {"message": f"HTTP {e.code} {e.reason}"}) from None

    def json(self, method: str, path: str, body: dict | None = None) -> dict:
        with self.request(method, path, body) as r:
            return json.loads(r.read())

    def events(self, job_id: str, after: str | None):
        """(id, type, data) of the job's event stream; returns when the server closes it."""
        headers = {"Accept": "text/event-stream"}
        if after:
            headers["Last-Event-ID"] = after
        with self.request("GET", f"/v1/jobs/{job_id}/events?preview_every=0", headers=headers,
                          timeout=60) as r:
            ev = {"id": None, "event": "message", "data": ""}
            for raw in r:
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line:
                    if ev["data"]:
                        yield ev["id"], ev["event"], json.loads(ev["data"])
                    ev = {"id": None, "event": "message", "data": ""}
                elif not line.startswith(":"):
                    k, _, v = line.partition(":")
                    v = v[1:] if v.startswith(" ") else v
                    if k == "data":
                        ev["data"] += v
                    elif k in ("id", "event"):
                        ev[k] = v


def request_body(args) -> dict:
    """The POST /v1/jobs body of `latentd generate` flags: every request field the CLI has
    (cli_request.request_values, from the declaration), uploads in base64, nothing dropped."""
    from latentd.cli_request import read_file, request_values

    body = {}
    for name, value in request_values(args).items():
        if value is None:
            continue
        if name in ("image", "mask"):
            value = base64.b64encode(read_file(value, "init-image" if name == "image" else name)).decode()
        elif name == "loras":         # a file is sent by its name: the server has its own adapters
            value = [dict(a, name=_adapter_name(a["name"])) for a in value]
        body[name] = value
    return body


def _adapter_name(name_or_path: str) -> str:
    from latentd.model.lora_catalog import SUFFIX
    return os.path.basename(name_or_path)[: -len(SUFFIX)] if name_or_path.endswith(SUFFIX) else name_or_path


def _asked_loras(args) -> list[dict]:
    from latentd.cli_request import request_values
    return request_values(args)["loras"] or []


LORA_FILE_HINT = ("--server sends an adapter file by its name (the file's stem): the server uses "
                  "the adapter of that name in its own adapter folders (GET /v1/loras), never the local file")


class Exit(Exception):
    """Stop with this exit code (the message is already printed)."""

    def __init__(self, code: int):
        self.code = code


def _fail(message: str, code: int = 2) -> Exit:
    print(f"latentd generate: {message}", file=sys.stderr)
    return Exit(code)


def run_remote(args) -> int:
    for attr, flag in ENGINE_ONLY:
        if getattr(args, attr, None):
            print(f"latentd generate: {flag} applies to the local engine, not to --server", file=sys.stderr)
            return 2
    remote = Remote(args.server, args.key)
    t0 = time.monotonic()
    try:
        job_id = _submit(remote, args)
        status, data, image = _follow(remote, job_id, args.steps)
        return _save(remote, args, job_id, status, data, image, time.monotonic() - t0)
    except Exit as e:
        return e.code


def _submit(remote: Remote, args) -> str:
    """POST /v1/jobs; the job id, or Exit(2) naming the refused field."""
    from latentd.model.errors import InvalidRequest

    try:
        return remote.json("POST", "/v1/jobs", request_body(args))["id"]
    except InvalidRequest as e:
        raise _fail(f"invalid {e.field}: {e.message}") from None
    except RemoteError as e:
        field = e.error.get("field") or e.error.get("param")
        what = (f"invalid {field}: " if field and e.status in (400, 422)
                else f"HTTP {e.status}{f' ({field})' if field else ''}: ")
        files = field == "loras" and any(_adapter_name(a["name"]) != a["name"] for a in _asked_loras(args))
        raise _fail(f"{what}{e}" + (f"\n{LORA_FILE_HINT}" if files else "")) from None
    except (urllib.error.URLError, OSError) as e:
        raise _fail(f"cannot reach {args.server}: {getattr(e, 'reason', e)}") from None


def _follow(remote: Remote, job_id: str, steps: int | None) -> tuple[str, dict, dict | None]:
    """Follow the job's events with a progress bar, resuming after a dropped connection, until it
    ends: (status, the final job, the last `image` event). Ctrl-C cancels the job (Exit(130))."""
    from tqdm import tqdm

    last, final, image, tries = None, None, None, 0
    bar = tqdm(total=steps or 1, desc="queued", unit="step")
    try:
        while final is None:
            try:
                for id_, type_, data in remote.events(job_id, last):
                    last = id_ or last
                    if type_ == "queued":
                        bar.set_description(f"queued (position {data.get('position')})")
                    elif type_ == "running":
                        bar.set_description("denoising")
                        bar.total, bar.n = data["total"], data["step"]
                        bar.refresh()
                    elif type_ == "image":
                        image = data
                    elif type_ in ("succeeded", "failed", "canceled", "error"):
                        final = (type_, data)
                        break
            except (urllib.error.URLError, OSError, RemoteError) as e:
                tries += 1
                if tries > 10 or (isinstance(e, RemoteError) and e.status < 500):
                    raise _fail(f"lost the event stream: {e}", 1) from None
                time.sleep(min(2 ** tries * 0.1, 3))
            if final is None and last is None:
                time.sleep(0.5)
    except KeyboardInterrupt:
        bar.close()
        try:
            remote.json("DELETE", f"/v1/jobs/{job_id}")
            print(f"latentd generate: canceled job {job_id}", file=sys.stderr)
        except (RemoteError, OSError):
            pass
        raise Exit(130) from None
    bar.n = bar.total
    bar.close()
    return final[0], final[1], image


def _save(remote: Remote, args, job_id: str, status: str, data: dict, image: dict | None,
          seconds: float) -> int:
    """Write the job's first image to --out and print what was drawn."""
    if status != "succeeded":
        err = data.get("error") or data
        raise _fail(f"job {job_id} {status}: {err.get('code', '')} {err.get('message', '')}".rstrip(), 1)
    images = data.get("images") or ([image] if image else [])
    if not images:
        raise _fail(f"job {job_id} succeeded without an image", 1)
    first = images[0]
    with remote.request("GET", first["url"], timeout=60) as r:
        encoded = r.read()
    with open(args.out, "wb") as f:
        f.write(encoded)
    if first.get("nsfw"):
        print("warning: the safety checker flagged the image; a black image was written", file=sys.stderr)
    p = data.get("params") or {}
    print(f"{args.out}: {p.get('width')}x{p.get('height')} seed={first['seed']} "
          f"sampler={p.get('sampler')}{'+karras' if p.get('karras') else ''} steps={p.get('steps')} "
          f"guidance={p.get('guidance_scale', 0):g} in {seconds:.2f}s (job {job_id} on {args.server})")
    return 0
