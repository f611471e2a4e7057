"""Forwarding one generation request to a worker: retries on another worker for a non-streamed
request (and for a stream before its first byte), SSE passed through event by event, a client
that leaves aborting the work at the worker, and the `Dispatch` finished on every path."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import httpx
from fastapi import Request
from fastapi.responses import Response

from radixfair.router.policies import ClientLimitError, NoHealthyWorkerError, RouteRequest, Usage
from radixfair.router.request_queue import overloaded
from radixfair.router.retry import retryable
from radixfair.router.state import Dispatch, RoutedRequest, RouterState, decrement
from radixfair.server.errors import APIError, error_body
from radixfair.server.held_stream import HeldStream
from radixfair.server.streaming import SSE_DONE, sse

logger = logging.getLogger(__name__)

DISCONNECT_POLL_SECS = 0.25
T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected while the router waited for the worker."""


def upstream_error(message: str, status: int = 502) -> APIError:
    return APIError(message, status=status, type_="upstream_error" if status == 502 else "service_unavailable",
                    headers={"Retry-After": "1"} if status == 503 else None)


def usage_of(path: str, body: Any, prompt_len: int) -> Usage | None:
    """What a worker's answer says was used (summed over the prompts of a batch)."""
    items = body if isinstance(body, list) else [body]
    prompt = cached = completion = 0
    found = False
    for item in items:
        if not isinstance(item, dict):
            continue
        u = item.get("usage") if path != "/generate" else item.get("meta_info")
        if not isinstance(u, dict):
            continue
        found = True
        prompt += int(u.get("prompt_tokens") or 0)
        completion += int(u.get("completion_tokens") or 0)
        details = u.get("prompt_tokens_details") if path != "/generate" else u
        if isinstance(details, dict):
            cached += int(details.get("cached_tokens") or 0)
    if not found:
        return None
    return Usage(prompt or prompt_len, min(cached, prompt or prompt_len), completion)


def worker_ttft(path: str, body: Any) -> float | None:
    """A whole native answer's time to first token at the worker (`meta_info.ttft`); the router adds
    the time the request spent before it was sent. OpenAI's answers do not say."""
    item = body[0] if path == "/generate" and isinstance(body, list) and body else body
    meta = item.get("meta_info") if path == "/generate" and isinstance(item, dict) else None
    ttft = meta.get("ttft") if isinstance(meta, dict) else None
    return float(ttft) if isinstance(ttft, (int, float)) and not isinstance(ttft, bool) and ttft >= 0 else None


async def _watch(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled (the connection to the worker closed, so the worker aborts) if the client
    disconnects first: a non-streaming handler is not told its client left."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECS)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _passthrough(r: httpx.Response) -> Response:
    headers = {k: v for k, v in r.headers.items() if k.lower() in ("retry-after", "www-authenticate")}
    return Response(r.content, status_code=r.status_code, headers=headers,
                    media_type=r.headers.get("content-type", "application/json"))


async def _acquire(state: RouterState, route: RouteRequest, tried: set[str]) -> Dispatch:
    try:
        return await state.acquire(route, tried)
    except NoHealthyWorkerError as e:
        raise upstream_error(f"no healthy worker: {e}", 503) from e
    except ClientLimitError as e:
        raise overloaded(str(e)) from e


async def forward(state: RouterState, request: Request, path: str, raw: bytes, routed: RoutedRequest,
                  stream: bool) -> Response:
    """Send the request to the worker the policy picks, retrying elsewhere as the flags allow. Until
    its first dispatch it counts as waiting (for a queue place, or held by the policy); when it
    leaves, `state.left(routed)` is told, once."""
    route = routed.route
    client = route.client_id
    state.waiting[client] += 1
    waiting = True
    handed_over = False

    def dispatched() -> None:
        nonlocal waiting
        if waiting:
            waiting = False
            decrement(state.waiting, client)

    try:
        slot = await state.queue.acquire()
    except BaseException:
        dispatched()
        state.left(routed)
        raise
    try:
        args = state.args
        max_retries = 0 if args.disable_retries else args.retry_max_retries
        headers = state.worker_headers(route.client_id)
        tried: set[str] = set()
        last: Response | None = None
        for attempt in range(max_retries + 1):
            if attempt:
                state.retries += 1
                await asyncio.sleep(state.backoff.delay_secs(attempt))
            try:
                d = await _acquire(state, route, tried)
            finally:
                dispatched()
            url = d.worker.url
            tried.add(url)
            key = (route.client_id, route.rid)
            if route.rid:
                state.holders[key] = d.worker
            try:
                if stream:
                    req = state.client.build_request("POST", url + path, content=raw, headers=headers)
                    r = await _watch(request, state.client.send(req, stream=True))
                    if r.status_code == 200:
                        handed_over = True

                        routed.ran = True

                        async def close(r: httpx.Response = r, d: Dispatch = d, key: tuple[str, str] = key) -> None:
                            try:
                                await r.aclose()
                            finally:
                                try:
                                    _done(state, d, key, slot=slot)
                                finally:
                                    state.left(routed)

                        return HeldStream(_relay(state, d, r, path, routed), close)
                    await r.aread()
                    await r.aclose()
                else:
                    sent = time.monotonic()
                    r = await _watch(request, state.client.post(url + path, content=raw, headers=headers))
            except ClientGone:
                routed.ran = True  # cut off while it ran: the trace keeps the load that arrived
                _done(state, d, key)
                return Response(status_code=499)  # nobody reads it; the worker saw its connection close
            except httpx.HTTPError as e:
                logger.warning("router: %s %s failed: %s", url, path, e)
                _done(state, d, key, ok=False)
                last = None
                continue
            except BaseException:
                _done(state, d, key)
                raise
            if retryable(r.status_code):
                # 429: the worker is busy, not broken; the breaker counts failures only
                _done(state, d, key, ok=None if r.status_code == 429 else False)
                last = _passthrough(r)
                continue
            usage = None
            if r.status_code == 200:
                routed.ran = True
                try:
                    answer = r.json()
                except ValueError:
                    answer = None
                usage = usage_of(path, answer, len(route.input_ids))
                routed.usage = usage
                if (ttft := worker_ttft(path, answer)) is not None:
                    routed.first_token = sent + ttft
            _done(state, d, key, usage, ok=True)
            return _passthrough(r)
        if last is not None:
            return last
        raise upstream_error(f"the request failed on {len(tried)} worker(s) after {max_retries} retries")
    finally:
        dispatched()
        if not handed_over:
            slot.release()
            state.left(routed)


def _done(state: RouterState, d: Dispatch, key: tuple[str, str], usage: Usage | None = None,
          ok: bool | None = None, slot: Any = None) -> None:
    if state.holders.get(key) is d.worker:
        del state.holders[key]
    try:
        d.finish(usage, ok)
    finally:
        if slot is not None:
            slot.release()


async def _relay(state: RouterState, d: Dispatch, r: httpx.Response, path: str,
                 routed: RoutedRequest) -> AsyncIterator[bytes]:
    """The worker's SSE events as they come; a worker lost mid-stream ends it with an error event."""
    prompt_len = len(routed.route.input_ids)
    buf = b""
    done = False
    usage: dict[int, Usage] = {}
    events = 0
    try:
        async for chunk in r.aiter_raw():
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                event += b"\n\n"
                if event == SSE_DONE:
                    done = True
                else:
                    events += 1
                    if routed.first_token is None:
                        routed.first_token = time.monotonic()
                    _note_usage(path, event, prompt_len, usage)
                yield event
        if buf.strip():
            yield buf
        if not done:
            raise httpx.RemoteProtocolError("the worker ended the stream without [DONE]")
        total = _sum_usage(usage) or Usage(prompt_len, 0, events)
        routed.usage = total
        d.finish(total, ok=True)
    except (GeneratorExit, asyncio.CancelledError):
        # the client left mid-stream: it was served what it was sent (the worker aborts the rest)
        d.finish(_sum_usage(usage), ok=None)
        raise
    except httpx.HTTPError as e:
        state.stream_errors += 1
        logger.warning("router: stream from %s broke: %s", d.worker.url, e)
        d.finish(_sum_usage(usage), ok=False)
        err = upstream_error(f"the worker serving this stream failed: {e}")
        yield sse(error_body(err.message, err.type, None, 502))
        yield SSE_DONE
    finally:
        await r.aclose()


def _note_usage(path: str, event: bytes, prompt_len: int, usage: dict[int, Usage]) -> None:
    if not event.startswith(b"data: "):
        return
    try:
        obj = json.loads(event[6:])
    except ValueError:
        return
    if not isinstance(obj, dict):
        return
    u = usage_of(path, obj, prompt_len)
    if u is not None:
        usage[int(obj.get("index") or 0)] = u


def _sum_usage(usage: dict[int, Usage]) -> Usage | None:
    if not usage:
        return None
    return Usage(*(sum(x) for x in zip(*usage.values(), strict=True)))
