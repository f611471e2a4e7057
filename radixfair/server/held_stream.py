"""An SSE response that runs a callback once it has been sent or abandoned."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, Awaitable, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class HeldStream(StreamingResponse):
    """Runs `on_close` (sync or async) after the response, however it ended. A client that left
    while a chunk was being sent leaves the body generator suspended at its yield: it is closed
    first, so its own `finally` (an engine abort, a worker stream's close) runs now rather than
    whenever the garbage collector gets to it."""

    def __init__(self, content: AsyncIterable[bytes], on_close: Callable[[], Awaitable[None] | None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                done = self._on_close()
                if inspect.isawaitable(done):
                    await done
