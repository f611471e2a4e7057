"""The native `/generate` result and stream chunks, in SGLang's shape.

A stream chunk carries, by default, the cumulative `text`, `output_ids` and `meta_info` of its
request (SGLang's frontend reads `text[pos:]`), logprobs included: that is O(length) bytes per chunk
by its nature. What must not grow with the length is the work per chunk, so the growing lists are
kept as JSON text and extended by each chunk's new entries; a chunk is then a few string joins, not
a re-serialization of thousands of logprob entries. With `--incremental-streaming-output` (SGLang's
flag) a chunk carries only what is new: its text, output ids and logprobs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from radixfair.io_struct import EngineOutput, RequestResult, TokenLogprob

TokenText = Callable[[int], str]


def _entry(x: TokenLogprob | tuple[float, int], token_text: TokenText | None) -> list[Any]:
    lp, tid = x[0], x[1]
    return [lp, tid, None if token_text is None else token_text(tid)]


def _top(x: TokenLogprob, token_text: TokenText | None) -> list[list[Any]] | None:
    return None if x.top is None else [_entry(t, token_text) for t in x.top]


def logprob_fields(inputs: Iterable[TokenLogprob], outputs: Iterable[TokenLogprob], top: bool,
                   token_text: TokenText | None) -> dict[str, list[Any]]:
    ins, outs = list(inputs), list(outputs)
    d: dict[str, list[Any]] = {"input_token_logprobs": [_entry(x, token_text) for x in ins],
                               "output_token_logprobs": [_entry(x, token_text) for x in outs]}
    if top:
        d["input_top_logprobs"] = [_top(x, token_text) for x in ins]
        d["output_top_logprobs"] = [_top(x, token_text) for x in outs]
    return d


def normalized_prompt_logprob(inputs: Iterable[TokenLogprob]) -> float | None:
    """SGLang: the mean over the prompt positions that have a logprob (the first one has none)."""
    lps = [x.logprob for x in inputs if x.logprob is not None]
    return sum(lps) / len(lps) if lps else None


def native_result(res: RequestResult, token_text: TokenText | None = None) -> dict[str, Any]:
    """A finished request as `/generate` returns it. With logprobs, `normalized_prompt_logprob` as
    SGLang computes it; with `token_text`, each logprob entry's third element is its token's text
    (`return_text_in_logprobs`)."""
    meta = res.meta_info(logprobs=False)
    out: dict[str, Any] = {"text": res.text, "output_ids": list(res.output_ids), "meta_info": meta}
    if res.return_logprob:
        meta.update(logprob_fields(res.input_logprobs, res.output_logprobs, res.top_logprobs_num > 0, token_text))
        npl = normalized_prompt_logprob(res.input_logprobs)
        if npl is not None:
            meta["normalized_prompt_logprob"] = npl
    return out


class _JsonArray:
    """A JSON array that only grows, kept as text: appending costs the new items only."""

    def __init__(self) -> None:
        self._body = ""

    def extend(self, items: Iterable[Any]) -> None:
        new = ", ".join(json.dumps(x, ensure_ascii=False) for x in items)
        if new:
            self._body = f"{self._body}, {new}" if self._body else new

    def text(self) -> str:
        return f"[{self._body}]"


class StreamEncoder:
    """One request's stream chunks, cumulative (SGLang's default) or `incremental`."""

    def __init__(self, res: RequestResult, incremental: bool, token_text: TokenText | None,
                 index: int | None) -> None:
        self.res = res
        self.incremental = incremental
        self.token_text = token_text
        self.index = index  # SGLang tags batch-stream chunks with the prompt's index
        self.top = res.top_logprobs_num > 0
        self._ids = _JsonArray()
        self._lists = {k: _JsonArray() for k in ("input_token_logprobs", "output_token_logprobs",
                                                  "input_top_logprobs", "output_top_logprobs")}
        self._npl: float | None = None

    def chunk(self, out: EngineOutput) -> str:
        """The JSON text of the chunk for `out`, already added to `self.res`."""
        res = self.res
        if out.input_logprobs:  # they all come in the first output
            self._npl = normalized_prompt_logprob(res.input_logprobs)
        meta = res.meta_info(logprobs=False)
        if self._npl is not None:
            meta["normalized_prompt_logprob"] = self._npl
        head: dict[str, Any] = {"text": out.text if self.incremental else res.text}
        if self.index is not None:
            head["index"] = self.index
        if self.incremental:
            head["output_ids"] = list(out.token_ids)
            if res.return_logprob:
                meta.update(logprob_fields(out.input_logprobs, out.output_logprobs, self.top, self.token_text))
            head["meta_info"] = meta
            return json.dumps(head, ensure_ascii=False)
        self._ids.extend(out.token_ids)
        parts = [json.dumps(head, ensure_ascii=False)[:-1], f', "output_ids": {self._ids.text()}']
        meta_text = json.dumps(meta, ensure_ascii=False)[:-1]
        if res.return_logprob:
            new = logprob_fields(out.input_logprobs, out.output_logprobs, self.top, self.token_text)
            for key, items in new.items():
                self._lists[key].extend(items)
                meta_text += f', "{key}": {self._lists[key].text()}'
        parts.append(f', "meta_info": {meta_text}}}}}')
        return "".join(parts)
