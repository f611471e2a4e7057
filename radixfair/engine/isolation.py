"""One request's failure stays that request's: sampling is batched, so a row that makes the batched
call raise (a value no validation foresaw) would otherwise fail every request of the batch, from
every client. Validation comes first (`SamplingParams`); this is what catches the rest."""

from __future__ import annotations

import logging

import torch

from radixfair.engine.constrained.mask import TokenMask
from radixfair.engine.sampler import Sampler, SampleResult
from radixfair.sched.request import Req

logger = logging.getLogger(__name__)

SAMPLING_FAILED = "internal error while sampling"


def sample_isolated(sampler: Sampler, logits: torch.Tensor, reqs: list[Req],
                    mask: TokenMask | None = None) -> tuple[SampleResult, dict[int, str]]:
    """`sampler.sample(logits, reqs, mask)`; if the batched call raises, every row again on its own,
    so that only the rows that fail alone are lost. Returns the result (token -1 for a failed row)
    and the failed rows' indices with the message their requests end with (details go to the log)."""
    try:
        return sampler.sample(logits, reqs, mask), {}
    except Exception:
        logger.exception("batched sampling of %d rows failed; sampling row by row", len(reqs))
    tokens: list[int] = []
    # a failed row's placeholders are never read: its request ends
    lps: list[float] = []
    tops: list[list[tuple[float, int]]] = []
    failed: dict[int, str] = {}
    for i, req in enumerate(reqs):
        try:
            one = sampler.sample(logits[i : i + 1], [req], None if mask is None else mask.for_row(i))
        except Exception:
            logger.exception("sampling failed for request %s", req.rid)
            failed[i] = SAMPLING_FAILED
            tokens.append(-1)
            lps.append(0.0)
            tops.append([])
            continue
        tokens.append(one.token_ids[0])
        lps.append(0.0 if one.logprobs is None else one.logprobs[0])
        tops.append([] if one.top_logprobs is None else one.top_logprobs[0])
    any_lp = any(r.return_logprob for r in reqs)
    any_top = any(r.top_logprobs_num > 0 for r in reqs)
    return SampleResult(tokens, lps if any_lp else None, tops if any_top else None), failed
