"""The endpoint's HTTP hardening, independent of the model: JSON errors, the request-body limit,
the bearer token, and per-request metrics.

Ray Serve's proxy has no request-body limit: it reads each body as it arrives into a buffer of
its own, before any replica has the request (a queued request's body sits in the proxy), and
passes it on when the replica asks. The replica enforces a limit here, which bounds what a
replica reads, not what the proxy buffers: that needs a limit in front of the proxy (nginx
``client_max_body_size``; see docs/serving.md). Starlette has a
``RequestBodyLimitMiddleware``, but it answers in plain text and rewrites any response to a
request whose Content-Length is over the limit, so errors would not all be JSON; this
middleware is the same 30 lines answering in JSON.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ApiError(Exception):
    """A request the endpoint refuses: an HTTP status, a short code and a message for people."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail

    def __reduce__(self) -> tuple[object, ...]:
        # Raised inside a Serve replica and re-raised in the ingress: it crosses a pickle.
        return (type(self), (self.status, self.code, self.detail))


def error_body(status: int, code: str, detail: str) -> dict[str, Any]:
    return {"error": code, "status": status, "detail": detail}


def error_response(status: int, code: str, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse(error_body(status, code, detail), status_code=status, headers=headers)


def too_large(size: int, limit: int, declared: bool) -> ApiError:
    size_text = f"{size} bytes (Content-Length)" if declared else f"over {limit} bytes"
    return ApiError(
        413,
        "body_too_large",
        f"request body is {size_text}; the limit is {limit} bytes (--max-body-bytes)",
    )


class RequestGuard:
    """ASGI middleware: refuse a declared Content-Length over ``max_body_bytes`` before reading
    anything, stop reading a streamed body once it passes the limit (the route sees an
    ``ApiError`` from ``receive``), and count every request's status and latency."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: Any) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            declared = Headers(scope=scope).get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                err = too_large(int(declared), self.max_body_bytes, declared=True)
                await error_response(err.status, err.code, err.detail)(scope, receive, send_status)
                return
            seen = 0

            async def capped_receive() -> Message:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body_bytes:
                        raise too_large(seen, self.max_body_bytes, declared=False)
                return message

            await self.app(scope, capped_receive, send_status)
        finally:
            self.metrics.record(scope.get("path", ""), status, time.perf_counter() - start)


def check_bearer(request: Request, token: str | None) -> None:
    """401 unless the request carries ``Authorization: Bearer <token>`` (when a token is set).
    ``hmac.compare_digest`` takes the same time wherever the strings differ."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer TOKEN)")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "unauthorized", "wrong bearer token")
