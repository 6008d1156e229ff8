"""uvicorn's httptools protocol with read limits: a deadline for the request headers, one for the body, and a
bound on the header bytes.

uvicorn times out only idle keep-alive connections (``timeout_keep_alive``, after a response): a connection
that never completes its headers, or trickles its body, is held forever, and httptools buffers headers of
any size. This subclass (uvicorn takes a protocol class as ``Config(http=...)``) adds, per request:

- ``header_timeout``: from the connection's start (or the first byte of the next request on a keep-alive
  connection) to the end of the headers; on expiry the connection is closed (with a 408 when part of a
  request arrived);
- ``body_timeout``: from the end of the headers to the end of the body; on expiry a 408 is sent when no
  response was started, and the connection is closed (the application sees a disconnect);
- ``max_header_bytes``: the request line and headers together; beyond it a 431 and the connection is closed.

``on_timeout(phase)`` (``"header"`` or ``"body"``) is called for each connection closed by a deadline, e.g.
to count it. A request whose body timed out carries ``scope["apex.timed_out"] = "body"`` for the
application, which then tells it apart from a client that left.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

TIMED_OUT_KEY = "apex.timed_out"


def _response(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": status}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


def bounded_protocol(header_timeout: float, body_timeout: float, max_header_bytes: int,
                     on_timeout: Callable[[str], None] | None = None) -> type[HttpToolsProtocol]:
    """A :class:`HttpToolsProtocol` subclass enforcing these limits (pass it as ``uvicorn.Config(http=...)``)."""

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._deadline: asyncio.TimerHandle | None = None
            self._header_bytes = 0
            self._began = False
            self._rejected = False
            self._arm(header_timeout, self._headers_timed_out)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self._rejected:
                super().data_received(data)

        # -- deadlines ---------------------------------------------------------------------------------
        def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, callback)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _close(self, phase: str, response: bytes | None) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            logger.info("closed the connection of %s: request %s not received within %.1f s", self._peer(), phase,
                        header_timeout if phase == "header" else body_timeout)
            if response is not None:
                self.transport.write(response)
            self.transport.close()
            if on_timeout is not None:
                on_timeout(phase)

        def _peer(self) -> str:
            return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"

        def _headers_timed_out(self) -> None:
            self._rejected = True
            self._close("header", _response(408, "Request Timeout", f"the request headers did not arrive within "
                                                                    f"{header_timeout:g} s") if self._began else None)

        def _body_timed_out(self) -> None:
            cycle = self.cycle
            started = cycle is not None and cycle.response_started
            if cycle is not None:
                cycle.scope[TIMED_OUT_KEY] = "body"  # type: ignore[typeddict-unknown-key]
            self._rejected = True
            self._close("body", None if started else _response(
                408, "Request Timeout", f"the request body did not arrive within {body_timeout:g} s"))

        def _count(self, size: int) -> None:
            self._header_bytes += size
            if self._header_bytes > max_header_bytes and not self._rejected:
                self._rejected = True
                self._disarm()
                logger.info("refused a request of %s: its headers exceed %d bytes", self._peer(), max_header_bytes)
                self.transport.write(_response(431, "Request Header Fields Too Large",
                                               f"the request line and headers exceed {max_header_bytes} bytes"))
                self.transport.close()

        # -- parser callbacks (no-ops once the connection is refused) ------------------------------------
        def on_message_begin(self) -> None:
            self._header_bytes = 0
            self._began = True
            if self._deadline is None:  # a keep-alive connection's next request
                self._arm(header_timeout, self._headers_timed_out)
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            if not self._rejected:
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            if not self._rejected:
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._rejected:
                return
            self._arm(body_timeout, self._body_timed_out)
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._rejected:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self._rejected:
                return
            self._disarm()
            self._began = False
            super().on_message_complete()

    return BoundedHttpToolsProtocol
