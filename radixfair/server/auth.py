"""API keys, operator keys and client identity: who a request is, for the fair policies.

With API keys, a key's client wins, so a caller cannot claim to be someone else; only a key marked
as a trusted proxy (the router) may name the client it forwards for, in the identity headers.
Without keys, identity comes from those headers or OpenAI's `user` field, which any caller can set:
trustworthy only behind a proxy that sets them (README, "Limits and security").
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fastapi import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from radixfair.server.errors import APIError, error_body

OPEN_PATHS = frozenset({"/health"})  # load balancers probe it without credentials
# opened by a browser, which sends no Bearer header: the handler itself requires the operator key and
# answers a page that asks for it (radixfair.server.fairness)
SELF_GUARDED_PATHS = frozenset({"/dashboard"})
DEFAULT_CLIENT = "default"
ADMIN_CLIENT = "admin"
MAX_CLIENT_ID_LEN = 128


@dataclass(frozen=True)
class ServerClient:
    """Who an API key belongs to; `weight` is its share under the fair policies (vtc, dlpm). A
    `trusted_proxy` key (a router) may name the client it forwards for in an identity header."""

    client: str
    weight: float = 1.0
    trusted_proxy: bool = False


@dataclass(frozen=True)
class Identity:
    """How requests are told apart: the identity headers tried in order (() turns them off), and
    whether API keys (`auth`) and operator keys (`admin`) are configured."""

    headers: tuple[str, ...]
    auth: bool
    admin: bool


class ApiKeyAuth:
    """With API keys configured, every path but the open ones needs `Authorization: Bearer KEY`; the
    key's client is put in the request state for `client_of`. An operator key is accepted anywhere
    and marks the request as an operator's (`is_admin`)."""

    def __init__(self, app: ASGIApp, keys: Mapping[str, ServerClient], admin_keys: Sequence[str] = ()) -> None:
        self.app = app
        self.keys = dict(keys)
        self.admin_keys = [k for k in admin_keys if k]

    @staticmethod
    def _match(token: str, candidates: Sequence[str]) -> bool:
        # compare against every key, in constant time each, so timing tells nothing about the keys
        found = False
        for k in candidates:
            found |= hmac.compare_digest(token.encode(), k.encode())
        return found

    def _lookup(self, token: str) -> ServerClient | None:
        found = None
        for k, client in self.keys.items():
            if hmac.compare_digest(token.encode(), k.encode()):
                found = client
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (not self.keys and not self.admin_keys):
            await self.app(scope, receive, send)
            return
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        state = scope.setdefault("state", {})
        if token and self._match(token, self.admin_keys):
            state["admin"] = True
            state["key_client"] = ServerClient(ADMIN_CLIENT)
        elif token and (client := self._lookup(token)) is not None:
            state["key_client"] = client
        elif self.keys and scope["path"] not in OPEN_PATHS and scope["path"] not in SELF_GUARDED_PATHS:
            response = JSONResponse(
                error_body("invalid or missing API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", code=401),
                status_code=401, headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _header_client(request: Request, headers: Sequence[str]) -> str | None:
    for h in headers:
        v = request.headers.get(h, "").strip()
        if v:
            if len(v) > MAX_CLIENT_ID_LEN:
                raise APIError(f"{h}: a client id has at most {MAX_CLIENT_ID_LEN} characters", param=h)
            return v
    return None


def client_of(request: Request, user: str | None = None) -> str:
    """The request's client: its API key's (a trusted proxy's: the identity header's, if it sent
    one), else the identity headers, else OpenAI's `user`, else "default"."""
    identity: Identity = request.app.state.radixfair.identity
    kc: ServerClient | None = getattr(request.state, "key_client", None)
    if kc is not None:
        if kc.trusted_proxy:
            return _header_client(request, identity.headers) or kc.client
        return kc.client
    client = _header_client(request, identity.headers) or user or DEFAULT_CLIENT
    if len(client) > MAX_CLIENT_ID_LEN:
        raise APIError(f"user: a client id has at most {MAX_CLIENT_ID_LEN} characters", param="user")
    return client


def is_admin(request: Request) -> bool:
    return bool(getattr(request.state, "admin", False))


def require_admin(request: Request) -> None:
    """Operator endpoints: open when neither API keys nor operator keys are configured; otherwise
    only for an operator key (with API keys on and no operator key set, closed to everyone)."""
    identity: Identity = request.app.state.radixfair.identity
    if is_admin(request) or (not identity.auth and not identity.admin):
        return
    if not identity.admin:
        raise APIError("this endpoint needs an operator key, and none is configured (--admin-api-key)",
                       status=403, type_="permission_error")
    if getattr(request.state, "key_client", None) is None:
        raise APIError("this endpoint needs an operator key (send 'Authorization: Bearer KEY')",
                       status=401, type_="authentication_error")
    raise APIError("this endpoint needs an operator key", status=403, type_="permission_error")


def operator_view(request: Request) -> bool:
    """Whether the caller may see operator-only details (the client list): an operator, or anyone
    when no keys of either kind are configured."""
    identity: Identity = request.app.state.radixfair.identity
    return is_admin(request) or (not identity.auth and not identity.admin)
