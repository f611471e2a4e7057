"""`create_app(engine, api_keys, args)`: the FastAPI app over one engine.

Handlers are thin adapters (`native_api`, `openai_api`): they turn a request body into
`EngineRequest`s (radixfair.io_struct, the only types that cross into the engine), have the engine
check and tokenize them off the event loop, and read its `EngineOutput`s. The engine owns
validation against the model and scheduling; the server owns HTTP framing, auth, client identity
and admission.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from radixfair.server import fairness, native_api, openai_api, tokenizer_api
from radixfair.server.admission import Admission, AdmissionLimits
from radixfair.server.auth import ApiKeyAuth, Identity, ServerClient
from radixfair.server.errors import install_error_handlers
from radixfair.server.metrics import ServerMetrics
from radixfair.server.middleware import BodyLimit, JSONBodies
from radixfair.server.request_log import RequestLog
from radixfair.server.server_args import ServerArgs
from radixfair.server.state import ServerState
from radixfair.server.version import version

if TYPE_CHECKING:
    from radixfair.engine.engine import Engine

# engine -> its metrics: apps over one engine share the counters, and they go with the engine
_METRICS: weakref.WeakKeyDictionary[Engine, ServerMetrics] = weakref.WeakKeyDictionary()


def metrics_for(engine: Engine, max_clients: int = ServerArgs.max_metric_clients) -> ServerMetrics:
    if engine not in _METRICS:
        _METRICS[engine] = ServerMetrics(engine.args.w_in, engine.args.w_out, max_clients)
    return _METRICS[engine]


def create_app(engine: Engine, api_keys: Mapping[str, ServerClient] | None = None,
               args: ServerArgs | None = None, **overrides: Any) -> FastAPI:
    """`overrides` replace fields of `args` (e.g. `max_body_bytes=1000`)."""
    args = replace(args or ServerArgs(), **overrides)
    app = FastAPI(title="radixfair", version=version(), lifespan=fairness.sampling)
    keys = dict(api_keys or {})
    identity = Identity(args.client_id_headers(), auth=bool(keys), admin=bool(args.admin_api_key))
    admission = Admission(AdmissionLimits(engine.args.max_running_requests, args.max_queued_requests,
                                          args.max_requests_per_client))
    app.state.radixfair = ServerState(engine, metrics_for(engine, args.max_metric_clients), identity, admission,
                                      args.incremental_streaming_output,
                                      RequestLog(args.log_requests_level) if args.log_requests else None,
                                      args.fairness_view(args.max_metric_clients),
                                      fairness.EngineFairness(engine), args.trace_recorder())
    install_error_handlers(app)
    app.include_router(native_api.router)
    app.include_router(openai_api.router)
    app.include_router(fairness.router)
    app.include_router(tokenizer_api.router)
    # the last added runs first: size limit and read deadline, then auth, then the JSON content-type fix
    app.add_middleware(JSONBodies)
    app.add_middleware(ApiKeyAuth, keys=keys, admin_keys=args.admin_api_key)
    app.add_middleware(BodyLimit, max_bytes=args.max_body_bytes, read_timeout=args.read_timeout)
    return app
