"""Running engine requests for a handler: outputs merged as they come, SSE framing, and the
disconnect watch that aborts work nobody waits for any more."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from fastapi import Request

from radixfair.io_struct import EngineOutput, RequestResult, TokenizedRequest, result_for
from radixfair.server.errors import APIError, error_body
from radixfair.server.state import ServerState

SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def error_event(e: APIError, index: int | None = None) -> bytes:
    """A request that failed after its stream began (its status line is long sent): an event with
    OpenAI's error object, and the HTTP status it would have had as `code`."""
    body = error_body(e.message, e.type, e.param, e.code or e.status)
    if index is not None:
        body["index"] = index
    return sse(body)


async def merge_streams(state: ServerState, treqs: list[TokenizedRequest], client: str,
                        record: bool = True) -> AsyncGenerator[tuple[int, EngineOutput], None]:
    """Outputs of several requests as they come, tagged with the request's index.

    Leaving early (client gone, error) cancels the pumps; each `generate_async` is closed, and
    its `finally` aborts the request so its KV is released and the scheduler stops working for it.
    `record` False keeps the server's own probes out of the fairness view and the trace.
    """
    q: asyncio.Queue[tuple[int, EngineOutput | None]] = asyncio.Queue()

    log = state.request_log
    arrival = time.monotonic()
    # which requests were seen to the end: the others (their client left, even before their pump
    # ran) are still counted as having arrived, for --record-trace
    ended = [False] * len(treqs)

    async def pump(i: int, treq: TokenizedRequest) -> None:
        text: list[str] | None = [] if log is not None and log.wants_text else None
        try:
            async with aclosing(state.engine.generate_async(treq)) as outs:
                async for out in outs:
                    q.put_nowait((i, out))
                    if text is not None:
                        text.append(out.text)
                    if out.finished:
                        ended[i] = True
                        state.finished(client, treq, out, arrival, record)
                        if log is not None:
                            log.finished(client, treq, out, None if text is None else "".join(text))
        finally:
            q.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, t)) for i, t in enumerate(treqs)]
    try:
        live = len(tasks)
        while live:
            i, out = await q.get()
            if out is None:
                live -= 1
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for i, treq in enumerate(treqs):
            if not ended[i]:
                state.finished(client, treq, None, arrival, record)


async def collect(state: ServerState, treqs: list[TokenizedRequest], client: str,
                  request: Request, record: bool = True) -> list[RequestResult]:
    """The final results of `treqs`, aborting them all if the HTTP client disconnects first."""
    results = [result_for(t.request) for t in treqs]

    async def run() -> None:
        async with aclosing(merge_streams(state, treqs, client, record)) as stream:
            async for i, out in stream:
                results[i].add(out)

    task = asyncio.create_task(run())
    try:
        # a non-streaming handler is not cancelled when its client goes away; poll for it so that
        # an abandoned long generation does not keep its KV and batch slot
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                # the answer goes nowhere now; what matters is that the requests were aborted
                await asyncio.gather(task, return_exceptions=True)
                return results
        await task
    finally:
        if not task.done():
            task.cancel()
    return results
