"""HTTP plumbing every route of the service shares: request size limits, the 4xx error format
naming the field (and the OpenAPI examples of each error status), the JSON content type, the
API-key guard, the 503 with Retry-After, the Host allow-list, request ids, and the request
metrics middleware."""

from __future__ import annotations

import contextvars
import fnmatch
import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving_layer.api_models import ValidationErrorResponse
from serving_layer.metrics import ServiceMetrics

log = logging.getLogger(__name__)

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


def field_errors(field: str, message: str) -> dict[str, list[dict[str, str]]]:
    """The body of a 4xx naming one field, the service's error format.

    >>> field_errors("header.Host", "not allowed")
    {'detail': [{'field': 'header.Host', 'message': 'not allowed'}]}
    """
    return {"detail": [{"field": field, "message": message}]}


def too_large_body(max_rows: int) -> dict[str, list[dict[str, str]]]:
    """The 413's body: the size limit and the rows it stands for."""
    return field_errors("body", f"the body is larger than {max_body_bytes(max_rows)} bytes; send at most {max_rows} rows per request")


def not_json_body(content_type: str) -> dict[str, list[dict[str, str]]]:
    """The 415's body, naming the content type sent."""
    return field_errors("body", f"the body must be JSON sent with Content-Type: application/json, not {content_type}")


def too_large_response(max_rows: int) -> JSONResponse:
    return JSONResponse(status_code=413, content=too_large_body(max_rows))


def body_error_responses(max_rows: int, invalid: dict[str, Any], invalid_description: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route reading a JSON body: 413, 415 and 422, each with an
    example of what the service really answers (``invalid``: the route's own 422 example)."""

    def documented(description: str, example: dict[str, Any]) -> dict[str, Any]:
        return {"model": ValidationErrorResponse, "description": description, "content": {"application/json": {"example": example}}}

    return {
        413: documented(f"The body is larger than {max_rows} rows allow.", too_large_body(max_rows)),
        415: documented("The body is not sent as JSON.", not_json_body("text/plain")),
        422: documented(invalid_description, invalid),
    }


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


def missing_api_key_body() -> dict[str, list[dict[str, str]]]:
    return field_errors(f"header.{API_KEY_HEADER}", f"missing {API_KEY_HEADER} header: this service requires an API key")


def unauthorized_responses(api_key: str) -> dict[int | str, dict[str, Any]]:
    """The 401 of the OpenAPI document when ``api_key`` is set (else nothing), with its example."""
    if not api_key:
        return {}
    example = {"application/json": {"example": missing_api_key_body()}}
    return {401: {"model": ValidationErrorResponse, "description": f"Missing or wrong {API_KEY_HEADER} header.", "content": example}}


def api_key_guard(expected: str) -> Callable[..., None]:
    """A dependency refusing requests without ``X-API-Key: <expected>`` (401 naming the header)."""
    scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="The key set in serving.api_key.")

    def check(key: Any) -> None:
        if key is None:
            detail = missing_api_key_body()["detail"]
        elif not hmac.compare_digest(key.encode(), expected.encode()):
            detail = field_errors(f"header.{API_KEY_HEADER}", f"wrong API key in the {API_KEY_HEADER} header")["detail"]
        else:
            return
        raise HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": API_KEY_HEADER})

    # Set here, not in the signature: a string annotation could not see ``scheme``.
    check.__annotations__["key"] = Annotated[str | None, Security(scheme)]
    return check


def unavailable(reason: str) -> HTTPException:
    """A 503 with Retry-After: something the answer needs is not loaded or not readable yet."""
    return HTTPException(status_code=503, detail=reason, headers={"Retry-After": str(RETRY_AFTER_S)})


# --------------------------------------------------------------------------- Host allow-list


def split_host(host: str) -> tuple[str, str | None]:
    """A Host header's name (lower case, an IPv6 address in brackets) and port.

    >>> split_host("LocalHost:8000"), split_host("[::1]:8000"), split_host("127.0.0.1"), split_host("[::1]")
    (('localhost', '8000'), ('[::1]', '8000'), ('127.0.0.1', None), ('[::1]', None))
    """
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") else None
    name, sep, port = host.rpartition(":")
    return (name, port) if sep and port.isdigit() else (host, None)


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """True when the Host header ``host`` matches an entry of ``allowed`` (``serving.allowed_hosts``):
    a name matches it on any port, ``name:port`` on that port only, ``*.example.com`` any
    subdomain, ``*`` anything.

    >>> [host_allowed(h, ["localhost", "127.0.0.1", "[::1]"]) for h in ("localhost:8000", "[::1]:8000", "evil.example:8000", "")]
    [True, True, False, False]
    >>> host_allowed("api.example.com", ["*.example.com"]), host_allowed("localhost:9000", ["localhost:8000"])
    (True, False)
    """
    name, port = split_host(host)
    if not name:
        return "*" in allowed
    for entry in allowed:
        want_name, want_port = split_host(entry)
        # fnmatch only where a * asks for it: the brackets of [::1] would read as a character set.
        same = fnmatch.fnmatchcase(name, want_name) if "*" in want_name else name == want_name
        if same and (want_port is None or want_port == port):
            return True
    return False


class AllowedHosts:
    """ASGI middleware answering 400 to a request whose Host header names no allowed host: a web
    page of another site that resolves its own name to 127.0.0.1 (DNS rebinding) then cannot
    reach a service on loopback, as MLflow's own server refuses it."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]) -> None:
        self.app, self.allowed = app, tuple(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "*" not in self.allowed:
            host = Headers(scope=scope).get("host", "")
            if not host_allowed(host, self.allowed):
                shown = f"{host[:100]!r}" if host else "missing"
                message = f"the Host header is {shown}: this service answers as {', '.join(self.allowed)} only (serving.allowed_hosts)"
                await JSONResponse(status_code=400, content=field_errors("header.Host", message))(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------- request ids

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def request_id_from(sent: str | None) -> str:
    """The id of a request: the client's ``X-Request-ID`` when it is 1-128 characters of
    ``A-Z a-z 0-9 . _ -``, else a new one (an invalid id is replaced, never refused: a request
    is not worth failing over its tracing header).

    >>> request_id_from("req-42.a_b"), len(request_id_from("bad id!")), len(request_id_from(None))
    ('req-42.a_b', 32, 32)
    """
    if sent is not None and _VALID_REQUEST_ID.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


def current_request_id() -> str:
    """The id of the request being handled (a new one outside a request)."""
    return _request_id.get() or uuid.uuid4().hex


class RequestIdLogFilter(logging.Filter):
    """Adds ``(request <id>)`` to each line logged while a request is handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _request_id.get()
        if request_id is not None and not getattr(record, "request_id", None):
            record.request_id = request_id
            record.msg = f"{record.msg} (request {request_id})"
        return True


def install_request_id_logging() -> None:
    """Put the request id in the log lines of every handler of the root logger (once)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdLogFilter) for f in handler.filters):
            handler.addFilter(RequestIdLogFilter())


class RequestIds:
    """ASGI middleware, outermost: each request gets its id (``request_id_from``), which the
    routes read in the ``X-Request-ID`` request header (``current_request_id``), every response
    carries back (errors included), and every log line written meanwhile names. An unhandled
    exception becomes a JSON 500 naming the id, logged with its traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(Headers(scope=scope).get(REQUEST_ID_HEADER))
        header = (b"x-request-id", request_id.encode())
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"x-request-id"] + [header]}
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        token = _request_id.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if started:
                raise
            body = {"detail": f"internal error: the service's log names request {request_id}"}
            await JSONResponse(status_code=500, content=body, headers={REQUEST_ID_HEADER: request_id})(scope, receive, send)
        finally:
            _request_id.reset(token)


def install_request_handling(
    app: FastAPI, max_rows: int, metrics: ServiceMetrics, union_tags: Collection[str], allowed_hosts: Sequence[str] = ("*",)
) -> None:
    """The service-wide middleware and error handlers, outermost: every request gets its id
    (``X-Request-ID``) and is timed into ``metrics``, a Host header not in ``allowed_hosts``
    answers 400, oversized bodies answer 413 before they are read, validation errors answer
    422 naming the field (415 for a body that is not JSON)."""
    too_large = too_large_response(max_rows)
    # A declared Content-Length is refused before reading; a chunked body is cut off by the
    # route's max_body_size, which raises the 413 handled here.
    app.add_middleware(ContentLengthLimit, max_bytes=max_body_bytes(max_rows), response=too_large)
    app.add_middleware(AllowedHosts, allowed=allowed_hosts)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(RequestIds)
    install_request_id_logging()

    @app.exception_handler(413)
    async def on_too_large(_: Request, __: Exception) -> JSONResponse:
        return too_large

    @app.exception_handler(RequestValidationError)
    async def on_invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if content_type and not is_json_content_type(content_type):
            return JSONResponse(status_code=415, content=not_json_body(content_type))
        return JSONResponse(status_code=422, content={"detail": format_validation_errors(exc.errors(), union_tags)})
