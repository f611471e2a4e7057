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
from dataclasses import dataclass, field, fields, replace
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
    message: str  # safe to show the caller: internal details go to the server's log, never here


class EngineUnavailable(RuntimeError):
    """The engine is shut down, or its thread died: nothing more can be served (HTTP 503)."""


def request_key(client_id: str, rid: str) -> str:
    """The engine's own id of a request: request ids are per client, so two clients may use the
    same rid at once and neither can reach (abort, or learn of) the other's."""
    return f"{len(client_id)}:{client_id}:{rid}"


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
                sampling_params=sp.replace(n=1, seed=None if sp.seed is None else sample_seed(sp.seed, k)))
        for k in range(sp.n)
    ]


def sample_seed(seed: int, k: int) -> int:
    """The seed of sample `k`: `seed + k`, wrapped into the 64-bit range a seed may take."""
    return (seed + k) % (1 << 64)


@dataclass(frozen=True)
class TokenizedRequest:
    """An `EngineRequest` the engine accepted: token ids, and sampling params fitted to the model's
    context (`max_new_tokens` clipped as SGLang clips it)."""

    request: EngineRequest
    input_ids: tuple[int, ...]
    sampling_params: SamplingParams
    grammar: object | None = None  # engine-private: the compiled output constraint, if any

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
    # of completion_tokens, those a grammar forced (jump-forward): computed as extend tokens, charged w_in
    forced_tokens: int = 0
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
    forced_tokens: int = 0
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
        self.forced_tokens = out.forced_tokens
        self.finish_reason = out.finish_reason
        self.error = out.error
        self.ttft = out.ttft
        self.e2e_latency = out.e2e_latency

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def meta_info(self, logprobs: bool = True) -> dict[str, Any]:
        """SGLang's `meta_info`: logprobs (unless `logprobs` is False) as `[logprob, token_id, None]`
        entries."""
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
        if self.forced_tokens:
            meta["jump_forward_tokens"] = self.forced_tokens
        if self.return_logprob and logprobs:
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
class ClientStats:
    """One client's place in a worker's scheduler: what the live fairness view (`/fairness`) shows."""

    client: str
    waiting: int  # requests queued, not yet admitted
    running: int  # requests in the running batch (a prompt being prefilled in chunks counts)
    service: float  # charged service so far: w_in per uncached prompt token + w_out per output token
    balance: float | None = None  # the policy's per-client state: DLPM's deficit, VTC's counter


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
    evictable_slots: int = 0  # held by the tree, no request using them
    protected_slots: int = 0  # held by the tree for running requests
    policy: str = ""  # the scheduling policy's name
    balance: str = ""  # what ClientStats.balance holds: "deficit" (dlpm), "counter" (vtc), "" (none)
    # per client; names clients, so it is left out of `to_dict` (which /get_server_info shows anyone)
    clients: tuple[ClientStats, ...] = ()

    @property
    def leaked_slots(self) -> int:
        """At idle (nothing running or waiting): slots neither free nor in the tree, which is 0
        unless KV leaked; while requests run, their private slots."""
        return self.max_total_tokens - self.free_slots - self.evictable_slots - self.protected_slots

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.input_tokens if self.input_tokens else 0.0

    @property
    def used_tokens(self) -> int:
        return self.max_total_tokens - self.free_slots

    def to_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "clients"}
        d["hit_rate"] = self.hit_rate
        d["leaked_slots"] = self.leaked_slots
        return d


@dataclass(frozen=True)
class RequestLimits:
    """How much one call (one `/generate` body, one `Engine.generate`) may ask for, so that no
    single request can exhaust the server. The defaults are `EngineArgs`'; each field's flag is
    named in the refusal, so a caller knows which limit it hit."""

    max_prompts_per_request: int = 256
    max_sequences_per_request: int = 512  # prompts x n
    max_request_tokens: int = 262144  # prompt tokens over all prompts and samples
    max_stop_token_ids: int = 256
    max_logprob_entries: int = 1 << 20  # returned logprob values, top logprobs included

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f.name} must be an integer >= 1, got {v!r}")

    @staticmethod
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    def refuse(self, field_name: str, what: str, limit: str) -> ValueError:
        return ValueError(f"{field_name}: {what}; the limit is {getattr(self, limit)} ({self.flag(limit)})")

    def check_sampling(self, raw: Any) -> None:
        """Checks on a sampling-params dict that must come before building it (a 200,000-id
        `stop_token_ids` would otherwise be validated id by id first)."""
        ids = raw.get("stop_token_ids") if isinstance(raw, dict) else getattr(raw, "stop_token_ids", None)
        if isinstance(ids, (list, tuple)) and len(ids) > self.max_stop_token_ids:
            raise self.refuse("stop_token_ids", f"{len(ids)} ids", "max_stop_token_ids")

    def check_tokenized(self, treqs: Sequence[TokenizedRequest]) -> None:
        """The limits that depend on token counts, over every request of one call."""
        tokens = sum(len(t.input_ids) for t in treqs)
        if tokens > self.max_request_tokens:
            raise self.refuse("prompt", f"{tokens} prompt tokens over all prompts and samples",
                              "max_request_tokens")
        entries = sum(logprob_entries(t) for t in treqs)
        if entries > self.max_logprob_entries:
            raise self.refuse("return_logprob", f"{entries} logprob values asked for (positions x "
                              "(1 + top_logprobs_num), over all prompts and samples)", "max_logprob_entries")


def logprob_entries(treq: TokenizedRequest) -> int:
    """How many logprob values a request may return: the prompt positions from `logprob_start_len`
    and every output token, each with its `top_logprobs_num` alternatives."""
    r = treq.request
    if not r.return_logprob:
        return 0
    prompt = max(0, len(treq.input_ids) - r.logprob_start_len) if r.logprob_start_len >= 0 else 0
    return (prompt + treq.sampling_params.max_new_tokens) * (1 + r.top_logprobs_num)


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
    limits: RequestLimits | None = None,
) -> tuple[list[EngineRequest], bool]:
    """SGLang's `/generate` inputs (also `Engine.generate`'s) as engine requests, prompt-major with
    each prompt's `n` samples in a row, and whether the input was one prompt rather than a batch.
    ValueError names what is wrong, or the limit the call is over (`limits`; the token-count limits
    are checked after tokenization, by `RequestLimits.check_tokenized`)."""
    lim = limits or RequestLimits()
    if (text is None) == (input_ids is None):
        raise ValueError("give exactly one of text (a prompt) or input_ids")
    prompts: list[Any]
    field_name = "input_ids" if input_ids is not None else "text"
    if input_ids is not None:
        if not isinstance(input_ids, list) or not input_ids:
            raise ValueError("input_ids is empty: give at least one token id (or a list of lists)")
        single = not isinstance(input_ids[0], list)
        prompts = [input_ids] if single else input_ids
    else:
        single = isinstance(text, str)
        prompts = [text] if isinstance(text, str) else text if isinstance(text, list) else [None]
    n = len(prompts)
    # counted before anything is built per prompt: a body of millions of one-token prompts costs
    # one len() here
    if n > lim.max_prompts_per_request:
        raise lim.refuse(field_name, f"{n} prompts in one request", "max_prompts_per_request")
    if input_ids is not None:
        if not all(isinstance(p, list) for p in prompts):
            raise ValueError("input_ids must be a list of token ids or a list of such lists")
    elif not all(isinstance(t, str) for t in prompts):
        raise ValueError("text must be a string or a list of strings")
    if isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != n:
            raise ValueError(f"{len(sampling_params)} sampling_params for {n} prompts")
        for p in sampling_params:
            lim.check_sampling(p)
        params = [_sampling_params(p) for p in sampling_params]
    else:
        lim.check_sampling(sampling_params)
        params = [_sampling_params(sampling_params)] * n
    sequences = sum(p.n for p in params)
    if sequences > lim.max_sequences_per_request:
        raise lim.refuse("n", f"{n} prompts x n = {sequences} sequences", "max_sequences_per_request")
    if input_ids is not None:
        tokens = sum(len(p) * sp.n for p, sp in zip(prompts, params, strict=True))
        if tokens > lim.max_request_tokens:
            raise lim.refuse("input_ids", f"{tokens} prompt tokens over all prompts and samples",
                             "max_request_tokens")
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
