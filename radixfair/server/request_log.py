"""`--log-requests`: one log line per finished request, as SGLang's flag of that name gives.

What a line carries grows with `--log-requests-level` (SGLang's levels): 0 the request's metadata
(request id, client, prompt/cached/output tokens, finish reason, time to first token, latency),
1 its sampling parameters too, 2 the prompt and output text cut to `TEXT_CUT` characters each,
3 the whole text. The text is never logged below level 2: prompts are the users' data.
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields

from radixfair.io_struct import EngineOutput, TokenizedRequest
from radixfair.sampling_params import SamplingParams

logger = logging.getLogger("radixfair.requests")

TEXT_CUT = 256
_DEFAULTS = SamplingParams()


class RequestLog:
    def __init__(self, level: int = 0) -> None:
        if level not in (0, 1, 2, 3):
            raise ValueError(f"--log-requests-level must be 0, 1, 2 or 3, got {level!r}")
        self.level = level
        # asked for explicitly: shown whatever --log-level says about everything else
        logger.setLevel(logging.INFO)

    @property
    def wants_text(self) -> bool:
        return self.level >= 2

    def finished(self, client: str, treq: TokenizedRequest, out: EngineOutput, output_text: str | None) -> None:
        """Log `treq`'s last output `out` (it carries the request's totals); `output_text` is its
        whole text when `wants_text`."""
        fr = out.finish_reason.type if out.finish_reason is not None else "unknown"
        ttft = "-" if out.ttft is None else f"{out.ttft:.3f}s"
        parts = [f"rid={treq.rid}", f"client={client}", f"prompt_tokens={out.prompt_tokens}",
                 f"cached_tokens={out.cached_tokens}", f"output_tokens={out.completion_tokens}", f"finish={fr}",
                 f"ttft={ttft}", f"latency={out.e2e_latency:.3f}s"]
        if out.error is not None:
            parts.append(f"error={out.error.kind.value}")
        if self.level >= 1:
            parts.append("sampling_params=" + json.dumps(_changed(treq.sampling_params), ensure_ascii=False))
        if self.level >= 2:
            r = treq.request
            prompt = r.text if r.text is not None else list(treq.input_ids)
            parts.append("prompt=" + self._cut(json.dumps(prompt, ensure_ascii=False)))
            parts.append("output=" + self._cut(json.dumps(output_text or "", ensure_ascii=False)))
        logger.info("finished " + " ".join(parts))

    def _cut(self, text: str) -> str:
        if self.level >= 3 or len(text) <= TEXT_CUT:
            return text
        return text[:TEXT_CUT] + f"...({len(text) - TEXT_CUT} more characters)"


def _changed(params: SamplingParams) -> dict[str, object]:
    """The sampling parameters that differ from the defaults (the rest would only lengthen the line)."""
    return {f.name: getattr(params, f.name) for f in fields(params)
            if getattr(params, f.name) != getattr(_DEFAULTS, f.name)}
