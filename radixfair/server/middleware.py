"""Pure ASGI middleware (no `BaseHTTPMiddleware`, which hides client disconnects from handlers)."""

from __future__ import annotations

import asyncio
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radixfair.server.errors import error_body


class BodyLimit:
    """A request body over `max_bytes` (by Content-Length, or as it streams in) is a 413, and one not
    in after `read_timeout` seconds a 408: a slow client cannot hold a body buffer forever. The body
    is read before the app runs (every body here is one JSON document), then replayed."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        too_big = length.isdigit() and int(length) > self.max_bytes
        chunks: list[bytes] = []
        size, more = 0, not too_big
        deadline = time.monotonic() + self.read_timeout
        while more:
            try:
                msg = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                body = error_body(f"the request body did not arrive within {self.read_timeout:g} s "
                                  "(--read-timeout)", code=408)
                await JSONResponse(body, status_code=408, headers={"Connection": "close"})(scope, receive, send)
                return
            if msg["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            too_big = size > self.max_bytes
            if too_big:
                break
        if too_big:
            body = error_body(f"the request body is larger than the server's limit of {self.max_bytes} bytes",
                              code=413)
            await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # e.g. http.disconnect, for `request.is_disconnected()`
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class JSONBodies:
    """Every POST body here is JSON: one sent with another content type (`curl -d '{...}'` sends a
    form type) is read as JSON rather than answered with a puzzling "expected an object"."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            ctype = dict(scope["headers"]).get(b"content-type", b"")
            if b"json" not in ctype:
                scope = dict(scope, headers=[*headers, (b"content-type", b"application/json")])
        await self.app(scope, receive, send)
