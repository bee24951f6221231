"""Following a job's event stream (jobs/events.py) for Server-Sent Events.

`follow()` is an async generator of (id, type, data): it registers the caller as a listener
(so the worker publishes progress and previews), reads the job's Redis stream with a blocking
XREAD on the async client (the event loop never waits on Redis), and ends after the job's final
event. Entries carry their stream id, which is the SSE `id:`; `queued` events are made up here
from the job record and carry no id, so a client's Last-Event-ID always names a stream entry.
"""
from __future__ import annotations

import json
import re
import time
from typing import AsyncIterator

from latentd.app.errors import ApiError
from latentd.jobs import events, keys
from latentd.jobs.state import TERMINAL

BLOCK_MS = 1000            # one XREAD waits this long; then the record is checked (queued, gone)
PING_S = 15.0              # an SSE comment this often keeps proxies from closing an idle stream
_EVENT_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")


def parse_last_event_id(value: str | None) -> str | None:
    """The Last-Event-ID header (a stream entry id such as 1712345678901-0), or ApiError 422."""
    if value is None or value == "":
        return None
    if not _EVENT_ID.match(value):
        raise ApiError(422, "invalid_value", "Last-Event-ID: must be an event id this stream sent "
                       "(like 1712345678901-0)", "Last-Event-ID", "an id from an earlier event")
    return value


def sse(type_: str, data: dict, id_: str | None = None) -> bytes:
    """One SSE frame (`data` is one JSON line)."""
    head = f"id: {id_}\n" if id_ else ""
    return f"{head}event: {type_}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


PING = b": ping\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}   # no proxy buffering


def stream_entries(resp) -> list[tuple]:
    """(id, fields) entries of an XREAD answer of one stream, whatever shape redis-py gives it:
    RESP2 [[stream, entries]], RESP3 {stream: entries} or (legacy) {stream: [entries]}."""
    if not resp:
        return []
    groups = resp.values() if isinstance(resp, dict) else [r[1] for r in resp]
    out = []
    for g in groups:
        if len(g) == 1 and isinstance(g[0], list) and (not g[0] or isinstance(g[0][0], (list, tuple))):
            g = g[0]
        out.extend(g)
    return out


async def follow(st, job_id: str, owner: str, after: str | None, every: int,
                 listener: str | None = None, deadline: float | None = None,
                 ) -> AsyncIterator[tuple[str | None, str, dict]]:
    """(id, type, data) of job_id's events after stream id `after` (None: from the start), until
    its final event. The caller has checked that the job is owner's. Yields (None, "ping", {})
    when nothing happened for PING_S, and (None, "timeout", {}) then stops once past `deadline`
    (time.monotonic())."""
    listener = listener or events.new_listener()
    key = keys.events(job_id)
    cursor = after or "0-0"
    events.watch(st.redis, job_id, listener, every)
    refreshed = last_sent = time.monotonic()
    check_at, last_queued = 0.0, None
    try:
        while True:
            now = time.monotonic()
            if now >= check_at:                     # the record: queued position, expiry
                check_at = now + BLOCK_MS / 1000
                d = st.jobs.get(job_id, owner)
                if d is None:
                    yield None, "error", {"code": "not_found", "message": "the job has expired"}
                    return
                if d["status"] == "queued" and d.get("queue_position") != last_queued:
                    last_queued = d.get("queue_position")
                    last_sent = now
                    yield None, "queued", {"position": last_queued}
                elif d["status"] in TERMINAL and not await st.aredis.exists(key):
                    yield None, d["status"], {}     # ended before its stream existed (or expired)
                    return
            if now - refreshed > events.WATCH_TTL_S / 3:
                events.watch(st.redis, job_id, listener, every)
                refreshed = now
            block = BLOCK_MS
            if deadline is not None:
                block = max(1, min(block, int((deadline - time.monotonic()) * 1000)))
            resp = await st.aredis.xread({key: cursor}, count=100, block=block)
            for eid, fields in stream_entries(resp):
                cursor = eid.decode() if isinstance(eid, bytes) else eid
                last_sent = time.monotonic()
                type_, data = events.parse(fields)
                yield cursor, type_, data
                if type_ in TERMINAL:
                    return
            if deadline is not None and time.monotonic() > deadline:
                yield None, "timeout", {}
                return
            if time.monotonic() - last_sent > PING_S:
                last_sent = time.monotonic()
                yield None, "ping", {}
    finally:
        try:
            events.unwatch(st.redis, job_id, listener)
        except Exception:  # noqa: BLE001 - the registration expires by itself
            pass
