"""What every handler shares: the engine, the metrics, the served model's name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from radixfair.io_struct import EngineRequest, TokenizedRequest
from radixfair.server.errors import APIError, param_of
from radixfair.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from radixfair.engine.engine import Engine


@dataclass
class ServerState:
    engine: Engine
    metrics: ServerMetrics
    auth: bool  # API keys are configured
    _token_texts: dict[int, str] = field(default_factory=dict)  # bounded by the vocabulary

    @property
    def model_name(self) -> str:
        return self.engine.model_path

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def check_model(self, model: str | None) -> None:
        """OpenAI's `model` must be an id `/v1/models` lists (or left out)."""
        if model is not None and model != self.model_name:
            raise APIError(f"model: '{model}' is not served here; /v1/models lists '{self.model_name}'",
                           status=404, param="model", code="model_not_found")

    async def tokenize(self, reqs: list[EngineRequest],
                       rename: Callable[[str], str] = lambda m: m) -> list[TokenizedRequest]:
        """Check and tokenize off the event loop (a long prompt must not stall other streams); a
        refusal is a 400 naming the field, in the caller's vocabulary (`rename`)."""
        try:
            return await run_in_threadpool(lambda: [self.engine.tokenize(r) for r in reqs])
        except ValueError as e:
            msg = rename(str(e))
            raise APIError(msg, param=param_of(msg, "prompt" if "prompt" in msg else None)) from e


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.radixfair
    return state


State = Annotated[ServerState, Depends(state_of)]  # a handler parameter: the app's shared state
