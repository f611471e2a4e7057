"""`create_app(engine, api_keys)`: the FastAPI app over one engine.

Handlers are thin adapters (`native_api`, `openai_api`): they turn a request body into
`EngineRequest`s (radixfair.io_struct, the only types that cross into the engine), have the engine
check and tokenize them off the event loop, and read its `EngineOutput`s. The engine owns
validation against the model and scheduling; the server owns HTTP framing, auth and client identity.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING

from fastapi import FastAPI

from radixfair.server import native_api, openai_api
from radixfair.server.auth import ApiKeyAuth, ServerClient
from radixfair.server.errors import install_error_handlers
from radixfair.server.metrics import ServerMetrics
from radixfair.server.middleware import BodyLimit, JSONBodies
from radixfair.server.state import ServerState
from radixfair.server.version import version

if TYPE_CHECKING:
    from radixfair.engine.engine import Engine

DEFAULT_MAX_BODY_BYTES = 8 << 20

# engine -> its metrics: apps over one engine share the counters, and they go with the engine
_METRICS: weakref.WeakKeyDictionary[Engine, ServerMetrics] = weakref.WeakKeyDictionary()


def metrics_for(engine: Engine) -> ServerMetrics:
    if engine not in _METRICS:
        _METRICS[engine] = ServerMetrics(engine.args.w_in, engine.args.w_out)
    return _METRICS[engine]


def create_app(engine: Engine, api_keys: Mapping[str, ServerClient] | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="radixfair", version=version())
    keys = dict(api_keys or {})
    app.state.radixfair = ServerState(engine, metrics_for(engine), auth=bool(keys))
    install_error_handlers(app)
    app.include_router(native_api.router)
    app.include_router(openai_api.router)
    # the last added runs first: size limit, then auth, then the JSON content-type fix
    app.add_middleware(JSONBodies)
    app.add_middleware(ApiKeyAuth, keys=keys)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app
