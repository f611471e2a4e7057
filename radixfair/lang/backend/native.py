"""A backend that speaks SGLang's native `/generate`: request bodies and result dicts in its shape.

Subclasses only carry the bodies: `RuntimeEndpoint` over HTTP, `InProcessBackend` to an engine in
this process. Everything else (how `gen` becomes a request, the prefill before a fork, scoring the
choices of `select`) is here, once.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from radixfair.lang.backend.base import Backend
from radixfair.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from radixfair.lang.errors import BackendError

if TYPE_CHECKING:
    from radixfair.lang.interpreter import StreamExecutor
    from radixfair.lang.ir import GenParams

# below this, a temperature means greedy (as in SamplingParams)
GREEDY_TEMPERATURE = 1e-5
# the last prompt tokens before a choice can merge with the choice's first characters when the two
# are tokenized together; scoring starts this many tokens early so that the choice's own tokens
# are found by comparing token ids with the prompt's
_BOUNDARY_TOKENS = 2


class NativeBackend(Backend):
    @abstractmethod
    def _generate(self, body: dict[str, Any]) -> Any:
        """A non-streaming `/generate`: one result dict, or a list for a batch."""

    @abstractmethod
    def _generate_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """A streaming `/generate`: result dicts with the cumulative text so far."""

    # ---- generation -------------------------------------------------------------------------------
    @staticmethod
    def gen_body(text: str, params: GenParams) -> dict[str, Any]:
        params = params.with_dtype_constraint()
        body: dict[str, Any] = {"text": text, "sampling_params": params.sampling_params()}
        for key in ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs"):
            value = getattr(params, key)
            if value is not None:
                body[key] = value
        return body

    def generate(self, s: StreamExecutor, params: GenParams) -> tuple[str, dict[str, Any]]:
        out = self._generate(self.gen_body(s.text_, params))
        _raise_if_failed(out)
        return out["text"], out["meta_info"]

    def generate_stream(self, s: StreamExecutor, params: GenParams) -> Iterator[tuple[str, dict[str, Any]]]:
        body = self.gen_body(s.text_, params)
        body["stream"] = True
        pos = 0
        for chunk in self._generate_stream(body):
            _raise_if_failed(chunk)
            text = chunk["text"]
            yield text[pos:], chunk["meta_info"]
            pos = len(text)

    def cache_prefix(self, prefix: str) -> None:
        if prefix:
            _raise_if_failed(self._prefill(prefix))

    def commit_lazy_operations(self, s: StreamExecutor) -> None:
        self.cache_prefix(s.text_)

    def _prefill(self, text: str) -> dict[str, Any]:
        out: dict[str, Any] = self._generate({"text": text, "sampling_params": {"max_new_tokens": 0}})
        return out

    # ---- select -----------------------------------------------------------------------------------
    def select(self, s: StreamExecutor, choices: Sequence[str], temperature: float,
               choices_method: ChoicesSamplingMethod) -> ChoicesDecision:
        """Score every choice from the logprobs of its tokens after the program's text: one prefill of
        the text (so the batch finds it cached), then one batch of prompt-logprob requests."""
        if temperature > GREEDY_TEMPERATURE:
            raise ValueError(f"select: only greedy selection (temperature 0) is supported (got {temperature})")
        choices = list(choices)
        prefix = s.text_
        start = 0
        texts = [prefix + c for c in choices]
        if prefix:
            pre = self._prefill(prefix)
            _raise_if_failed(pre)
            start = max(pre["meta_info"]["prompt_tokens"] - _BOUNDARY_TOKENS, 0)
            texts.insert(0, prefix)  # its tokens from `start` on tell where each choice's tokens begin
        outs = self._generate({
            "text": texts, "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True, "return_text_in_logprobs": True, "logprob_start_len": start,
        })
        for out in outs:
            _raise_if_failed(out)
        entries = [o["meta_info"]["input_token_logprobs"] for o in outs]
        base_ids = [e[1] for e in entries.pop(0)] if prefix else []
        choice_entries = [_after_common_prefix(e, base_ids) for e in entries]
        normalized = [_mean_logprob(e) for e in choice_entries]
        unconditional = None
        if choices_method.requires_unconditional_logprobs:
            outs = self._generate({
                "input_ids": [[e[1] for e in es] for es in choice_entries],
                "sampling_params": {"max_new_tokens": 0, "temperature": 0},
                "return_logprob": True, "return_text_in_logprobs": True, "logprob_start_len": 0,
            })
            for out in outs:
                _raise_if_failed(out)
            unconditional = [o["meta_info"]["input_token_logprobs"] for o in outs]
        return choices_method(
            choices=choices,
            normalized_prompt_logprobs=normalized,
            input_token_logprobs=choice_entries,
            output_token_logprobs=[[] for _ in choices],
            unconditional_token_logprobs=unconditional,
        )


def _after_common_prefix(entries: list[Any], base_ids: list[int]) -> list[Any]:
    k = 0
    while k < len(base_ids) and k < len(entries) and entries[k][1] == base_ids[k]:
        k += 1
    return entries[k:]


def _mean_logprob(entries: Sequence[Any]) -> float:
    values = [e[0] for e in entries if e[0] is not None]
    return sum(values) / len(values) if values else 0.0


def _raise_if_failed(out: dict[str, Any]) -> None:
    """A request the engine ended with an error (it was accepted, so the status was 200)."""
    error = out.get("meta_info", {}).get("error")
    if error:
        raise BackendError(str(error))
