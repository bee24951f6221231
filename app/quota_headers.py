"""The X-RateLimit-*-<Q> headers of a key's quotas (app/quota.py) on every response to it."""
from __future__ import annotations

from starlette.requests import Request

from latentd.app.deps import token_of
from latentd.app.state import app_state


class QuotaHeadersMiddleware:
    """Adds the X-RateLimit-*-<Q> headers to every response to a key with a quota (read after the
    route ran, so an admission's own count is in them). The key is found the way owner_of finds
    it; a request without a valid key, or a key without a quota, is left alone, and a Redis
    error leaves the headers out rather than failing the response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st = app_state(scope["app"])
        owner = quota = None
        if st.keys is not None:
            token = token_of(Request(scope))            # as owner_of reads it
            owner = st.keys.owner(token) if token else None
            quota = st.keys.quota(owner) if owner else None
        if not quota:
            return await self.app(scope, receive, send)

        async def send_with_headers(msg):
            if msg["type"] == "http.response.start":
                try:
                    extra = await st.quotas.headers(owner, quota)
                except Exception:  # noqa: BLE001 - headers are advisory; the answer still goes out
                    extra = {}
                msg = {**msg, "headers": list(msg.get("headers", [])) +
                       [(k.lower().encode(), v.encode()) for k, v in extra.items()]}
            await send(msg)

        await self.app(scope, receive, send_with_headers)
