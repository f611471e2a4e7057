"""API keys and client identity: who a request is, for the fair policies.

An API key's client wins, so a caller with a key cannot claim to be someone else; without keys,
identity comes from a header or OpenAI's `user` field, which any caller can set.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from radixfair.server.errors import error_body

CLIENT_HEADERS = ("x-client-id", "x-gateway-inference-fairness-id")
OPEN_PATHS = frozenset({"/health"})  # load balancers probe it without credentials
DEFAULT_CLIENT = "default"


@dataclass(frozen=True)
class ServerClient:
    """Who an API key belongs to; `weight` is its share under the fair policies (vtc, dlpm)."""

    client: str
    weight: float = 1.0


class ApiKeyAuth:
    """With keys configured, every path but the open ones needs `Authorization: Bearer KEY`; the
    key's client is put in the request state for `client_of`."""

    def __init__(self, app: ASGIApp, keys: Mapping[str, ServerClient]) -> None:
        self.app = app
        self.keys = dict(keys)

    def _lookup(self, token: str) -> ServerClient | None:
        # compare against every key, in constant time each, so timing tells nothing about the keys
        found = None
        for k, client in self.keys.items():
            if hmac.compare_digest(token.encode(), k.encode()):
                found = client
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        client = self._lookup(token.strip()) if scheme.lower() == "bearer" else None
        if client is None:
            response = JSONResponse(
                error_body("invalid or missing API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", code=401),
                status_code=401, headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["key_client"] = client
        await self.app(scope, receive, send)


def client_of(request: Request, user: str | None = None) -> str:
    """The request's client: its API key's, else the identity headers, else OpenAI's `user`."""
    kc: ServerClient | None = getattr(request.state, "key_client", None)
    if kc is not None:
        return kc.client
    for h in CLIENT_HEADERS:
        v = request.headers.get(h, "").strip()
        if v:
            return v
    return user or DEFAULT_CLIENT
