"""What every handler shares: the engine, the metrics, admission, identity, the served model's name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from radixfair.io_struct import EngineOutput, EngineRequest, TokenizedRequest
from radixfair.metrics.live_fairness import FairnessSource, FairnessView
from radixfair.sampling_params import is_utf8
from radixfair.server.admission import Admission
from radixfair.server.auth import Identity
from radixfair.server.errors import APIError, param_of, unavailable
from radixfair.server.metrics import ServerMetrics
from radixfair.server.request_log import RequestLog
from radixfair.server.trace_recorder import TraceRecorder

if TYPE_CHECKING:
    from radixfair.engine.engine import Engine


@dataclass
class ServerState:
    engine: Engine
    metrics: ServerMetrics
    identity: Identity
    admission: Admission
    incremental_streaming_output: bool = False
    request_log: RequestLog | None = None  # --log-requests
    fairness: FairnessView = field(default_factory=FairnessView)  # /fairness, /dashboard
    fairness_source: FairnessSource | None = None  # what the view reads (the engine's stats)
    trace_recorder: TraceRecorder | None = None  # --record-trace
    _token_texts: dict[int, str] = field(default_factory=dict)  # bounded by the vocabulary

    @property
    def auth(self) -> bool:
        """API keys are configured."""
        return self.identity.auth

    @property
    def model_name(self) -> str:
        """The id /v1/models lists (--served-model-name, or the model's clean name): never a path."""
        return self.engine.model_names.served

    def finished(self, client: str, treq: TokenizedRequest, out: EngineOutput | None, arrival: float,
                 traffic: bool = True) -> None:
        """A request left: count its last output in the metrics and (if it is users' `traffic`, not
        the server's own probe) in the fairness view and the trace. `out` None: it was abandoned
        before its last output (its client left)."""
        if out is not None:
            self.metrics.observe(client, out)
            if traffic:
                self.fairness.observe(client, out.prompt_tokens, out.cached_tokens, out.ttft, out.e2e_latency)
        rec = self.trace_recorder
        if rec is None or not traffic or (out is not None and out.error is not None):
            return  # refused requests never ran: not part of the load to replay
        # what it was served; cut off before the end, what it asked for (the load that arrived)
        output_len = treq.sampling_params.max_new_tokens
        if out is not None and (out.finish_reason is None or out.finish_reason.type != "abort"):
            output_len = out.completion_tokens
        rec.record(client, treq.input_ids, output_len, arrival)

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def check_model(self, model: str | None) -> None:
        """OpenAI's `model` must be the id `/v1/models` lists, or the repo id the server was started
        with (or left out)."""
        if model is not None and model not in self.engine.model_names.accepted:
            raise APIError(f"model: '{model}' is not served here; /v1/models lists '{self.model_name}'",
                           status=404, param="model", code="model_not_found")

    def check_alive(self) -> None:
        """A stopped engine answers at once with 503, before any work is accepted."""
        if not self.engine.alive:
            raise unavailable("the engine is not running" if self.engine.failure is None else self.engine.failure)

    def check_rids(self, treqs: list[TokenizedRequest]) -> None:
        """A stream's status line goes out before the engine answers: a request id the client already
        has in flight is refused first, as a 400 (the engine would refuse it anyway)."""
        for t in treqs:
            if self.engine.in_flight(t.request.client_id, t.rid):
                raise APIError(f"rid: duplicate request id {t.rid!r}: another of your requests in flight uses it",
                               param="rid")

    async def tokenize(self, reqs: list[EngineRequest],
                       rename: Callable[[str], str] = lambda m: m) -> list[TokenizedRequest]:
        """Check and tokenize off the event loop (a long prompt must not stall other streams); a
        refusal is a 400 naming the field, in the caller's vocabulary (`rename`)."""
        try:
            return await run_in_threadpool(self.engine.tokenize_all, reqs)
        except ValueError as e:
            msg = rename(str(e))
            raise APIError(msg, param=param_of(msg, "prompt" if "prompt" in msg else None)) from e

    async def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The chat template over `messages`, off the event loop (a template over a huge conversation
        is slow); what the template rejects is a 400 on `messages`."""
        def render() -> str:
            return self.engine.tokenizer.apply_chat_template(messages)

        try:
            text = await run_in_threadpool(render)
        except ValueError as e:
            raise APIError(str(e), param="messages") from e
        except Exception as e:  # a template error on this input (e.g. roles it rejects) is the caller's
            raise APIError(f"messages: the chat template failed: {e}", param="messages") from e
        if not is_utf8(text):
            raise APIError("messages: not valid Unicode (a lone surrogate such as \\ud800)", param="messages")
        return text


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.radixfair
    return state


State = Annotated[ServerState, Depends(state_of)]  # a handler parameter: the app's shared state
