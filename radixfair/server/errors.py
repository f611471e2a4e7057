"""Errors in OpenAI's shape, on every endpoint: 4xx for what the client got wrong, naming the field."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """A client error with OpenAI's error shape."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type_
        self.code = code


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: int | str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code or e.status), status_code=e.status)


def param_of(message: str, default: str | None = None) -> str | None:
    """The field a validation message names: SamplingParams writes 'field: ...'."""
    head, sep, _ = message.partition(":")
    if sep and head.isidentifier():
        return head
    return default


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        parts, param = [], None
        for err in e.errors():
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            if err.get("type") == "json_invalid":
                parts.append(f"the body is not valid JSON: {err.get('msg')}")
                continue
            field = ".".join(loc) or "body"
            param = param or (loc[0] if loc else None)
            parts.append(f"{field}: {err.get('msg')}")
        return JSONResponse(error_body("; ".join(parts) or "invalid request", param=param, code=400),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), code=e.status_code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error")
        return JSONResponse(error_body(f"internal error: {e}", "internal_server_error", code=500),
                            status_code=500)
