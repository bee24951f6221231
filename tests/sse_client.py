"""A small Server-Sent Events reader for tests (httpx streaming), plus a background reader that
collects events while the test does something else."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import httpx


@dataclass
class Event:
    id: str | None
    type: str
    data: dict


def iter_events(resp: httpx.Response):
    """Events of an open text/event-stream response, as the SSE spec frames them."""
    ev = {"id": None, "event": "message", "data": []}
    for line in resp.iter_lines():
        if line == "":
            if ev["data"]:
                yield Event(ev["id"], ev["event"], json.loads("\n".join(ev["data"])))
            ev = {"id": None, "event": "message", "data": []}
        elif line.startswith(":"):
            continue
        else:
            k, _, v = line.partition(":")
            v = v[1:] if v.startswith(" ") else v
            if k == "data":
                ev["data"].append(v)
            elif k in ("id", "event"):
                ev[k if k == "id" else "event"] = v


def read_all(client: httpx.Client, path: str, headers: dict | None = None, limit: int = 10000,
             timeout: float = 120) -> list[Event]:
    """Every event until the server closes the stream."""
    out = []
    with client.stream("GET", path, headers=headers or {}, timeout=timeout) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for ev in iter_events(resp):
            out.append(ev)
            if len(out) >= limit:
                break
    return out


class Reader(threading.Thread):
    """Reads a stream in the background on its own client (closed at the end); `events` grows
    as they arrive."""

    def __init__(self, client: httpx.Client, path: str, headers: dict | None = None):
        super().__init__(daemon=True)
        self.client, self.path, self.headers = client, path, headers or {}
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self.status: int | None = None

    def run(self):
        try:
            with self.client.stream("GET", self.path, headers=self.headers, timeout=120) as resp:
                self.status = resp.status_code
                for ev in iter_events(resp):
                    self.events.append(ev)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e
        finally:
            self.client.close()

    def wait_for(self, pred, timeout: float = 60) -> Event:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for ev in self.events[seen:]:
                if pred(ev):
                    return ev
            seen = len(self.events)
            if self.error is not None or not self.is_alive():
                break
            time.sleep(0.01)
        raise AssertionError(f"no such event; got {[e.type for e in self.events]} "
                             f"(error {self.error!r}, status {self.status})")
