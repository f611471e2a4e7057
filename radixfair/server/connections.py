"""How uvicorn runs the app: a bound on open connections, and a deadline on each request's headers.

uvicorn closes an idle keep-alive connection, but a connection that trickles its request headers a
byte at a time (or a fresh one that sends nothing) is never timed out, and with a connection limit
a few hundred of them would shut everyone else out. The body has its own deadline, in
`middleware.BodyLimit`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from radixfair.server.server_args import ServerArgs


def header_deadline_protocol(read_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request's headers are not complete
    within `read_timeout` seconds of the connection opening or of its previous response."""

    class HeaderDeadlineH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self._arm()  # first: a pipelined request handled inside the call below disarms it again
            super().on_response_complete()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are in
                self._disarm()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(read_timeout, self._expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineH11Protocol


def uvicorn_config(app: Any, args: ServerArgs, **kwargs: Any) -> uvicorn.Config:
    """`args`' host, port, connection limit (`limit_concurrency`: past it uvicorn answers 503) and
    header deadline; `kwargs` go to `uvicorn.Config` as they are."""
    return uvicorn.Config(app, host=args.host, port=args.port, limit_concurrency=args.max_connections,
                          http=header_deadline_protocol(args.read_timeout), **kwargs)
