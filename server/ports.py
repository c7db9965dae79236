"""A pinned UDP port range for WebRTC (ICE host candidates), so firewall and NAT rules can be written.

aioice binds each candidate socket to port 0 (any free port). This event loop binds such requests to the
first free port of the configured range instead; every other datagram endpoint is left alone.
"""

from __future__ import annotations

import asyncio
import itertools
import socket


class PortRangeEventLoop(asyncio.SelectorEventLoop):
    port_range: tuple[int, int] | None = None
    _next = itertools.count()

    async def create_datagram_endpoint(self, protocol_factory, local_addr=None, remote_addr=None, **kwargs):
        if self.port_range is None or local_addr is None or local_addr[1] != 0:
            return await super().create_datagram_endpoint(protocol_factory, local_addr, remote_addr, **kwargs)
        low, high = self.port_range
        span = high - low + 1
        start = next(self._next) % span  # spread binds over the range instead of always probing from low
        for i in range(span):
            port = low + (start + i) % span
            try:
                return await super().create_datagram_endpoint(protocol_factory, (local_addr[0], port),
                                                              remote_addr, **kwargs)
            except OSError:
                continue
        raise OSError(f"no free UDP port in {low}-{high} for a WebRTC connection (all {span} in use)")


def loop_factory(port_range: tuple[int, int] | None):
    """An event loop factory for uvicorn / asyncio.run."""

    def make() -> asyncio.AbstractEventLoop:
        loop = PortRangeEventLoop()
        loop.port_range = port_range
        return loop

    return make


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
