"""HTTP plumbing every route of the service shares: request size limits, the 4xx error format
naming the field, the JSON content type, the API-key guard, the 503 with Retry-After, and the
request metrics middleware."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Collection, Sequence
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving_layer.metrics import ServiceMetrics

RETRY_AFTER_S = 5
# Bytes of JSON allowed per row: a row at its longest ids is ~650 bytes; the rest is room
# for pretty-printing. Bodies beyond max_rows rows of this are refused before parsing.
BODY_BYTES_PER_ROW = 2048
BODY_BYTES_BASE = 64 * 1024


def max_body_bytes(max_rows: int) -> int:
    """Largest request body read, so an oversized request costs no parsing.

    >>> max_body_bytes(1000)
    2113536
    """
    return BODY_BYTES_BASE + max_rows * BODY_BYTES_PER_ROW


def format_validation_errors(errors: Sequence[dict[str, Any]], union_tags: Collection[str] = ()) -> list[dict[str, str]]:
    """Pydantic/FastAPI validation errors as ``[{"field": "rows.0.position", "message": ...}]``.

    The ``body`` prefix and the tag of a union body (``union_tags``, e.g. row or batch) are
    dropped, so ``field`` is the path a client wrote in its JSON.

    >>> format_validation_errors([{"loc": ("body", "batch", "rows", 0, "position"), "type": "greater_than_equal",
    ...                            "msg": "Input should be greater than or equal to 1"}], {"batch", "row"})
    [{'field': 'rows.0.position', 'message': 'Input should be greater than or equal to 1'}]
    >>> format_validation_errors([{"loc": ("body", "row", "colour"), "type": "extra_forbidden", "msg": "x"}], {"batch", "row"})
    [{'field': 'colour', 'message': 'unknown field'}]
    """
    formatted = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ())]
        kind = error.get("type", "")
        if loc[:1] == ["body"]:
            loc = loc[1:]
            if loc[:1] and loc[0] in union_tags:
                loc = loc[1:]
        if kind == "json_invalid":
            # FastAPI puts the character offset in loc; it belongs in the message.
            reason = (error.get("ctx") or {}).get("error", "")
            where = f" at character {loc[0]}" if loc else ""
            formatted.append({"field": "body", "message": f"invalid JSON{where}: {reason}".rstrip(": ")})
            continue
        field = ".".join(loc) or "body"
        if kind == "extra_forbidden":
            message = "unknown field"
        elif kind == "missing" and field == "body":
            message = "a JSON body is required"
        elif kind == "model_attributes_type" and field == "body":
            message = 'expected a JSON object: one row, or {"rows": [...]}'
        else:
            message = str(error.get("msg", "invalid value"))
        formatted.append({"field": field, "message": message})
    return formatted


def is_json_content_type(content_type: str) -> bool:
    """``application/json`` or any ``+json`` type, parameters ignored.

    >>> is_json_content_type("application/json; charset=utf-8"), is_json_content_type("text/plain")
    (True, False)
    """
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def too_large_response(max_rows: int) -> JSONResponse:
    message = f"the body is larger than {max_body_bytes(max_rows)} bytes; send at most {max_rows} rows per request"
    return JSONResponse(status_code=413, content={"detail": [{"field": "body", "message": message}]})


class ContentLengthLimit:
    """ASGI middleware answering ``response`` to requests declaring a body over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int, response: Response) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.response = response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = Headers(scope=scope).get("content-length", "")
            if length.isdigit() and int(length) > self.max_bytes:
                await self.response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestMetrics:
    """ASGI middleware timing every HTTP request into ``metrics``, by route template (so
    /features/user/u1 and /features/user/u2 count as one route)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(scope.get("method", "?"), route, status[0], time.perf_counter() - started)


API_KEY_HEADER = "X-API-Key"


def api_key_guard(expected: str) -> Callable[..., None]:
    """A dependency refusing requests without ``X-API-Key: <expected>`` (401 naming the header)."""
    scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="The key set in serving.api_key.")

    def check(key: Any) -> None:
        if key is None:
            message = f"missing {API_KEY_HEADER} header: this service requires an API key"
        elif not hmac.compare_digest(key.encode(), expected.encode()):
            message = f"wrong API key in the {API_KEY_HEADER} header"
        else:
            return
        raise HTTPException(
            status_code=401, detail=[{"field": f"header.{API_KEY_HEADER}", "message": message}],
            headers={"WWW-Authenticate": API_KEY_HEADER},
        )  # fmt: skip

    # Set here, not in the signature: a string annotation could not see ``scheme``.
    check.__annotations__["key"] = Annotated[str | None, Security(scheme)]
    return check


def unavailable(reason: str) -> HTTPException:
    """A 503 with Retry-After: something the answer needs is not loaded or not readable yet."""
    return HTTPException(status_code=503, detail=reason, headers={"Retry-After": str(RETRY_AFTER_S)})


def install_request_handling(app: FastAPI, max_rows: int, metrics: ServiceMetrics, union_tags: Collection[str]) -> None:
    """The service-wide middleware and error handlers, outermost: oversized bodies answer 413
    before they are read, every request is timed into ``metrics``, validation errors answer 422
    naming the field (415 for a body that is not JSON)."""
    too_large = too_large_response(max_rows)
    # A declared Content-Length is refused before reading; a chunked body is cut off by the
    # route's max_body_size, which raises the 413 handled here.
    app.add_middleware(ContentLengthLimit, max_bytes=max_body_bytes(max_rows), response=too_large)
    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.exception_handler(413)
    async def on_too_large(_: Request, __: Exception) -> JSONResponse:
        return too_large

    @app.exception_handler(RequestValidationError)
    async def on_invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if content_type and not is_json_content_type(content_type):
            message = f"the body must be JSON sent with Content-Type: application/json, not {content_type}"
            return JSONResponse(status_code=415, content={"detail": [{"field": "body", "message": message}]})
        return JSONResponse(status_code=422, content={"detail": format_validation_errors(exc.errors(), union_tags)})
