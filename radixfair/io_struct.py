"""The contract between the engine and whatever drives it: the HTTP server, the frontend language's
in-process backend, a router's worker client. Pure Python, no torch.

An `EngineRequest` is one prompt to complete (a batch, or `n` samples of a prompt, is several of
them: see `expand_samples`). The engine checks it against the model's limits and tokenizes it into
a `TokenizedRequest`, then answers with `EngineOutput`s: each carries only what is new since the
previous one (text, token ids, logprobs), so the engine's work per token stays constant however
long the output grows; the last one has the finish reason. `RequestResult` folds them back into
the cumulative result, in SGLang's `{"text", "output_ids", "meta_info"}` shape where wanted.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from radixfair.sampling_params import SamplingParams


class TokenLogprob(NamedTuple):
    logprob: float | None  # None for the first prompt token (nothing predicts it)
    token_id: int
    top: tuple[tuple[float, int], ...] | None = None  # (logprob, token id), best first


@dataclass(frozen=True)
class FinishReason:
    type: str  # "stop" | "length" | "abort"
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """SGLang's `meta_info.finish_reason`."""
        d: dict[str, Any] = {"type": self.type}
        if self.type == "stop":
            d["matched"] = self.matched
        elif self.type == "length":
            d["length"] = self.length
        else:
            d["message"] = self.message
        return d


class ErrorKind(enum.Enum):
    """Why a request ended without a normal finish: who is to blame decides the HTTP status."""

    INVALID_REQUEST = "invalid_request"  # the caller's fault (e.g. a request id already in use): 4xx
    INTERNAL = "internal"  # the server failed while running it: 5xx
    UNAVAILABLE = "unavailable"  # the engine stopped before finishing it: 503


@dataclass(frozen=True)
class RequestError:
    kind: ErrorKind
    message: str


def new_rid() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class EngineRequest:
    """One prompt, as text or token ids, with how to sample it and who asks."""

    text: str | None = None
    input_ids: Sequence[int] | None = None
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    rid: str = field(default_factory=new_rid)
    client_id: str = "default"
    return_logprob: bool = False
    logprob_start_len: int = -1  # first prompt position whose logprob is returned; -1: none
    top_logprobs_num: int = 0
    stream: bool = True  # False: only the final output is sent

    def __post_init__(self) -> None:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        if self.text is not None and not isinstance(self.text, str):
            raise ValueError(f"text must be a string, got {type(self.text).__name__}")
        if not isinstance(self.rid, str) or not self.rid:
            raise ValueError("rid: must be a non-empty string")
        if not isinstance(self.top_logprobs_num, int) or not 0 <= self.top_logprobs_num <= 20:
            raise ValueError(f"top_logprobs_num: must be in [0, 20] (got {self.top_logprobs_num!r})")
        if not isinstance(self.logprob_start_len, int) or self.logprob_start_len < -1:
            raise ValueError(f"logprob_start_len: must be an integer >= -1 (got {self.logprob_start_len!r})")


def expand_samples(req: EngineRequest) -> list[EngineRequest]:
    """`n` independent samples of a prompt as `n` requests (the prompt's KV is shared through the
    radix cache): rids `{rid}-{k}`, and seeded copies get seed + k so that they differ."""
    sp = req.sampling_params
    if sp.n == 1:
        return [req]
    return [
        replace(req, rid=f"{req.rid}-{k}",
                sampling_params=sp.replace(n=1, seed=None if sp.seed is None else sp.seed + k))
        for k in range(sp.n)
    ]


@dataclass(frozen=True)
class TokenizedRequest:
    """An `EngineRequest` the engine accepted: token ids, and sampling params fitted to the model's
    context (`max_new_tokens` clipped as SGLang clips it)."""

    request: EngineRequest
    input_ids: tuple[int, ...]
    sampling_params: SamplingParams

    @property
    def rid(self) -> str:
        return self.request.rid


@dataclass(frozen=True)
class EngineOutput:
    """What is new for one request since its previous output; the last one has `finish_reason`."""

    rid: str
    text: str  # new text (stop strings never shown; a possible stop-string prefix is held back)
    token_ids: tuple[int, ...]  # new output token ids
    output_logprobs: tuple[TokenLogprob, ...] = ()  # for the new tokens, with return_logprob
    input_logprobs: tuple[TokenLogprob, ...] = ()  # prompt logprobs, all in the first output
    prompt_tokens: int = 0
    completion_tokens: int = 0  # so far
    cached_tokens: int = 0  # prompt tokens served from the radix cache
    finish_reason: FinishReason | None = None
    error: RequestError | None = None
    ttft: float | None = None  # seconds from arrival to the first output token
    e2e_latency: float = 0.0  # seconds from arrival to this output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestResult:
    """The cumulative state of one request, folded from its outputs in order."""

    rid: str
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    input_logprobs: list[TokenLogprob] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: FinishReason | None = None
    error: RequestError | None = None
    ttft: float | None = None
    e2e_latency: float = 0.0
    return_logprob: bool = False
    top_logprobs_num: int = 0

    def add(self, out: EngineOutput) -> None:
        self.text += out.text
        self.output_ids.extend(out.token_ids)
        self.input_logprobs.extend(out.input_logprobs)
        self.output_logprobs.extend(out.output_logprobs)
        self.prompt_tokens = out.prompt_tokens
        self.completion_tokens = out.completion_tokens
        self.cached_tokens = out.cached_tokens
        self.finish_reason = out.finish_reason
        self.error = out.error
        self.ttft = out.ttft
        self.e2e_latency = out.e2e_latency

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def meta_info(self) -> dict[str, Any]:
        """SGLang's `meta_info`: logprobs as `[logprob, token_id, None]` entries."""
        meta: dict[str, Any] = {
            "id": self.rid,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason.to_dict() if self.finish_reason else None,
            "e2e_latency": self.e2e_latency,
        }
        if self.ttft is not None:
            meta["ttft"] = self.ttft
        if self.return_logprob:
            meta["input_token_logprobs"] = [logprob_entry(x) for x in self.input_logprobs]
            meta["output_token_logprobs"] = [logprob_entry(x) for x in self.output_logprobs]
            if self.top_logprobs_num > 0:
                meta["input_top_logprobs"] = [top_entries(x) for x in self.input_logprobs]
                meta["output_top_logprobs"] = [top_entries(x) for x in self.output_logprobs]
        if self.error is not None:
            meta["error"] = self.error.message
        return meta

    def to_dict(self) -> dict[str, Any]:
        """SGLang's `/generate` result."""
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": self.meta_info()}


def result_for(req: EngineRequest) -> RequestResult:
    return RequestResult(req.rid, return_logprob=req.return_logprob, top_logprobs_num=req.top_logprobs_num)


def default_input_logprobs(treq: TokenizedRequest) -> tuple[TokenLogprob, ...]:
    """SGLang's prompt logprobs for `return_logprob` without a `logprob_start_len`: its default start
    is the last prompt position, and the first entry it returns never has a value, so one entry,
    `(None, last prompt token)`. (SGLang's frontend reads one entry per prompt of an `input_ids`
    batch.) Empty for any other request."""
    r = treq.request
    if r.return_logprob and r.logprob_start_len == -1 and treq.input_ids:
        return (TokenLogprob(None, treq.input_ids[-1]),)
    return ()


def logprob_entry(x: TokenLogprob) -> tuple[float | None, int, None]:
    return (x.logprob, x.token_id, None)


def top_entries(x: TokenLogprob) -> list[tuple[float, int, None]] | None:
    return None if x.top is None else [(lp, t, None) for lp, t in x.top]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of one worker's queue and KV cache."""

    running: int
    waiting: int
    input_tokens: int  # prompt tokens of admitted requests
    cached_tokens: int  # of which served from the radix cache
    prefill_tokens: int  # tokens computed in prefill passes (re-prefills after retraction too)
    decode_tokens: int
    retractions: int
    evicted_tokens: int
    tree_tokens: int  # tokens the radix tree holds
    free_slots: int
    max_total_tokens: int  # KV pool size

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.input_tokens if self.input_tokens else 0.0

    @property
    def used_tokens(self) -> int:
        return self.max_total_tokens - self.free_slots

    def to_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        d["hit_rate"] = self.hit_rate
        return d


def build_requests(
    text: str | list[str] | None = None,
    input_ids: list[int] | list[list[int]] | None = None,
    sampling_params: Any = None,
    rid: str | list[str] | None = None,
    client_id: str = "default",
    return_logprob: bool = False,
    logprob_start_len: int = -1,
    top_logprobs_num: int = 0,
    stream: bool = True,
) -> tuple[list[EngineRequest], bool]:
    """SGLang's `/generate` inputs (also `Engine.generate`'s) as engine requests, prompt-major with
    each prompt's `n` samples in a row, and whether the input was one prompt rather than a batch.
    ValueError names what is wrong."""
    if (text is None) == (input_ids is None):
        raise ValueError("give exactly one of text (a prompt) or input_ids")
    prompts: list[Any]
    if input_ids is not None:
        if not isinstance(input_ids, list) or not input_ids:
            raise ValueError("input_ids is empty: give at least one token id (or a list of lists)")
        single = not isinstance(input_ids[0], list)
        prompts = [input_ids] if single else list(input_ids)
        if not all(isinstance(p, list) for p in prompts):
            raise ValueError("input_ids must be a list of token ids or a list of such lists")
    else:
        single = isinstance(text, str)
        prompts = [text] if isinstance(text, str) else text if isinstance(text, list) else [None]
        if not all(isinstance(t, str) for t in prompts):
            raise ValueError("text must be a string or a list of strings")
    n = len(prompts)
    if isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != n:
            raise ValueError(f"{len(sampling_params)} sampling_params for {n} prompts")
        params = [_sampling_params(p) for p in sampling_params]
    else:
        params = [_sampling_params(sampling_params)] * n
    rids = [rid] if isinstance(rid, str) else rid
    if rids is not None and len(rids) != n:
        raise ValueError(f"{len(rids)} rids for {n} prompts")
    out: list[EngineRequest] = []
    for i, prompt in enumerate(prompts):
        req = EngineRequest(
            text=prompt if isinstance(prompt, str) else None,
            input_ids=None if isinstance(prompt, str) else prompt,
            sampling_params=params[i],
            rid=rids[i] if rids is not None else new_rid(),
            client_id=client_id,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
            stream=stream,
        )
        out.extend(expand_samples(req))
    return out, single


def _sampling_params(p: Any) -> SamplingParams:
    return p if isinstance(p, SamplingParams) else SamplingParams.from_dict(p)
