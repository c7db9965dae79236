"""Connection-level limits uvicorn does not have: a deadline for a request's headers.

uvicorn's h11 protocol arms its keep-alive timer only after a response, so a client that opens a socket and
trickles header bytes (slowloris) or sends nothing at all is held forever. This protocol closes a connection
whose request headers are not complete within `header_timeout_s` of the moment it started waiting for them
(connection open, or the end of the previous response). Bodies have their own deadline in the routes
(`read_body`), and `limit_concurrency` / `timeout_keep_alive` are plain uvicorn settings (cli.py).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineProtocol(H11Protocol):
    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._seen_cycle: object | None = None  # the request whose headers have arrived
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle is self._seen_cycle or self.cycle.response_complete:
            self.transport.close()  # no request in progress: nothing to answer

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and self.cycle is not self._seen_cycle and not self.cycle.response_complete:
            self._seen_cycle = self.cycle  # a request's headers arrived: its body has the route's deadline
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's headers are on the clock (keep-alive covers silence too)

    def handle_websocket_upgrade(self, event) -> None:
        self._disarm()  # the WebSocket protocol takes the connection over
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def header_deadline_protocol(timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class to pass as uvicorn's `http=`, with this deadline."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": timeout_s})
