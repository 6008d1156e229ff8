"""ASGI middleware of the server: the API key, and a last-resort handler that keeps a bug a 500 on a live
connection.

:class:`ApiKeyMiddleware` requires ``Authorization: Bearer <key>`` on the protected paths (``/v1/*``, and
``/metrics`` when asked) and answers 401 otherwise; keys are compared as SHA-256 digests with
:func:`secrets.compare_digest`, so the time taken says nothing about the key. ``OPTIONS`` passes (a CORS
preflight carries no credentials; the CORS middleware, outside this one, answers it).

:class:`UnexpectedErrorMiddleware` sits inside Starlette's ``ServerErrorMiddleware``: an exception no
handler took is logged once (with its traceback) and answered with a 500 that names its type only (the
internal text stays in the log). Without it Starlette re-raises after its own 500, uvicorn logs the
traceback a second time and drops the connection.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)


def _json_response(status: int, payload: dict, headers: dict[str, str] | None = None) -> tuple[Message, Message]:
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    return ({"type": "http.response.start", "status": status, "headers": raw},
            {"type": "http.response.body", "body": body, "more_body": False})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...], protect_metrics: bool = False,
                 on_refused: Callable[[str], None] | None = None) -> None:
        if not api_keys or not all(isinstance(k, str) and k for k in api_keys):
            raise ValueError("api_keys must be non-empty strings")
        self.app = app
        self.digests = tuple(_digest(k) for k in api_keys)
        self.protect_metrics = protect_metrics
        self.on_refused = on_refused

    def protects(self, path: str) -> bool:
        return path.startswith("/v1/") or path == "/v1" or (self.protect_metrics and path == "/metrics")

    def authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = _digest(token.strip())
        ok = False
        for expected in self.digests:  # every key is compared: the time does not depend on which one matched
            ok |= secrets.compare_digest(digest, expected)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not self.protects(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self.authorized(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        if self.on_refused is not None:
            self.on_refused(scope["path"])
        start, body = _json_response(401, {"error": {
            "message": "a valid API key is required: send 'Authorization: Bearer <key>'",
            "type": "authentication_error", "param": None, "code": 401}}, {"WWW-Authenticate": "Bearer"})
        await send(start)
        await send(body)


class UnexpectedErrorMiddleware:
    def __init__(self, app: ASGIApp, on_error: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if self.on_error is not None:
                self.on_error(scope["path"])
            if started:  # nothing more can be said on this response; uvicorn closes the connection
                return
            start, body = _json_response(500, {"error": {
                "message": f"internal error ({type(error).__name__}); the server log has the details",
                "type": "internal_error", "param": None, "code": 500}})
            await send(start)
            await send(body)
