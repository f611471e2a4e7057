"""Errors in OpenAI's shape, on every endpoint: 4xx for what the client got wrong, naming the field."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixfair.io_struct import EngineUnavailable, ErrorKind, RequestError, RequestResult

logger = logging.getLogger(__name__)


class APIError(Exception):
    """A client error with OpenAI's error shape."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type_
        self.code = code
        self.headers = headers


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: int | str | None = None) -> dict[str, Any]:
    return {"error": {"message": _encodable(message), "type": type_, "param": None if param is None else _encodable(param),
                      "code": code}}


def _encodable(text: str) -> str:
    """A message may quote what the caller sent, lone surrogates included: escaped, so that the
    error response itself can be encoded."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code or e.status), status_code=e.status,
                        headers=e.headers)


def engine_error(err: RequestError, rename: Callable[[str], str] = lambda m: m) -> APIError:
    """A request the engine ended with an error, as HTTP: the caller's fault is a 400 naming the field,
    a failure while serving it a 500, a stopped engine a 503. The engine's messages name no internals."""
    if err.kind is ErrorKind.INVALID_REQUEST:
        msg = rename(err.message)
        return APIError(msg, param=param_of(msg))
    if err.kind is ErrorKind.UNAVAILABLE:
        return unavailable(err.message)
    return APIError(err.message, status=500, type_="internal_server_error")


def unavailable(message: str) -> APIError:
    return APIError(message, status=503, type_="service_unavailable", headers={"Retry-After": "5"})


def first_error(results: Iterable[RequestResult]) -> RequestError | None:
    """The error to answer a call with: a client error first (it says what to fix), else any."""
    errors = [r.error for r in results if r.error is not None]
    for e in errors:
        if e.kind is ErrorKind.INVALID_REQUEST:
            return e
    return errors[0] if errors else None


def param_of(message: str, default: str | None = None) -> str | None:
    """The field a validation message names: SamplingParams writes 'field: ...'."""
    head, sep, _ = message.partition(":")
    if sep and head.isidentifier():
        return head
    return default


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "function-after"})


def _field_path(loc: Iterable[Any]) -> list[str]:
    """The field names in a pydantic error location, without the tags it adds for unions (a model's
    class name, `str`, `list[int]`) and list indices: ('body', 'sampling_params', 'SamplingParamsBody',
    'stop', 'str') -> ['sampling_params', 'stop']."""
    out = []
    for x in loc:
        if not isinstance(x, str) or x == "body" or not x.isidentifier() or x in _TYPE_TAGS or x[:1].isupper():
            continue
        out.append(x)
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        parts: list[str] = []
        param = None
        for err in e.errors():
            if err.get("type") == "json_invalid":
                parts.append(f"the body is not valid JSON: {err.get('msg')}")
                continue
            loc = _field_path(err.get("loc", ()))
            param = param or (loc[-1] if loc else None)
            part = f"{'.'.join(loc) or 'body'}: {err.get('msg')}"
            if part not in parts:
                parts.append(part)
        return JSONResponse(error_body("; ".join(parts) or "invalid request", param=param, code=400),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), code=e.status_code), status_code=e.status_code)

    @app.exception_handler(EngineUnavailable)
    async def _engine_unavailable(_: Request, e: EngineUnavailable) -> JSONResponse:
        return error_response(unavailable(str(e)))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception) -> JSONResponse:
        # the details are for the operator's log; a response never carries them
        logger.exception("internal error")
        return JSONResponse(error_body("internal server error", "internal_server_error", code=500),
                            status_code=500)
