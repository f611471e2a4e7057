"""Turns logits into tokens: penalties, temperature, top-k / top-p / min-p, seeds, logprobs.

Work is batched over requests; the expensive paths (sorting the vocabulary, per-request RNG)
run only for the rows that asked for them, so an all-greedy batch is one argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixfair.engine.constrained.mask import TokenMask, apply_token_mask
from radixfair.sched.request import Req


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # logprob of each sampled token under the model's distribution
    top_logprobs: list[list[tuple[float, int]]] | None


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, rid: str) -> None:
        self._generators.pop(rid, None)

    def _generator(self, req: Req) -> torch.Generator:
        g = self._generators.get(req.rid)
        if g is None:
            assert req.sampling_params.seed is not None
            g = torch.Generator(device=self.device)
            g.manual_seed(req.sampling_params.seed)
            self._generators[req.rid] = g
        return g

    def sample(self, logits: torch.Tensor, reqs: list[Req], mask: TokenMask | None = None) -> SampleResult:
        """`logits`: float32 `[len(reqs), vocab]` for the rows that sample; `mask`: the grammar's
        allowed tokens for the constrained ones among them (applied after the penalties, before
        temperature and the top-k/p/min-p cuts; logprobs stay the model's own)."""
        want_lp = any(r.return_logprob for r in reqs)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_lp else None
        unbanned = logits
        logits = self._apply_penalties(logits, reqs)
        if mask is not None:
            apply_token_mask(logits, mask, unbanned)
        params = [r.sampling_params for r in reqs]
        if all(p.greedy for p in params):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample_mixed(logits, reqs)
        token_list = tokens.tolist()
        lps: list[float] | None = None
        tops: list[list[tuple[float, int]]] | None = None
        if raw_logprobs is not None:
            lps = raw_logprobs.gather(1, tokens.view(-1, 1)).view(-1).tolist()
            k = max(r.top_logprobs_num for r in reqs)
            if k > 0:
                vals, idx = raw_logprobs.topk(k, dim=-1)
                vl, il = vals.tolist(), idx.tolist()
                tops = [
                    list(zip(vl[i][: r.top_logprobs_num], il[i][: r.top_logprobs_num], strict=True))
                    for i, r in enumerate(reqs)
                ]
        return SampleResult(token_list, lps, tops)

    def _apply_penalties(self, logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        rows = [i for i, r in enumerate(reqs) if r.sampling_params.has_penalties]
        min_rows = [
            i for i, r in enumerate(reqs) if len(r.output_ids) < r.sampling_params.min_new_tokens
        ]
        if not rows and not min_rows:
            return logits
        logits = logits.clone()
        vocab = logits.shape[1]
        for i in rows:
            sp = reqs[i].sampling_params
            row = logits[i]
            if sp.repetition_penalty != 1.0:
                # HF semantics: every token seen so far, prompt included
                seen = torch.tensor(sorted(set(reqs[i].fill_ids)), dtype=torch.long, device=logits.device)
                seen = seen[seen < vocab]
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
            if (sp.frequency_penalty or sp.presence_penalty) and reqs[i].output_ids:
                # OpenAI semantics: output tokens only
                out = torch.tensor(reqs[i].output_ids, dtype=torch.long, device=logits.device)
                counts = torch.zeros(vocab, dtype=logits.dtype, device=logits.device)
                counts.scatter_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
                row -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(logits.dtype)
        for i in min_rows:
            # min_new_tokens: the request may not stop yet, so its stop tokens are impossible
            r = reqs[i]
            banned = set(r.sampling_params.stop_token_ids)
            if not r.sampling_params.ignore_eos:
                banned |= set(r.eos_token_ids)
            ids = [t for t in banned if t < vocab]
            if ids:
                logits[i, ids] = float("-inf")
        return logits

    def _sample_mixed(self, logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        params = [r.sampling_params for r in reqs]
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=logits.device)
        probs = torch.softmax(logits / temps.unsqueeze(1), dim=-1)
        if any(p.top_k > 0 for p in params):
            vocab = probs.shape[1]
            ks = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
            kmax = max(ks)
            kth = probs.topk(kmax, dim=-1).values  # [B, kmax] descending
            idx = torch.tensor([k - 1 for k in ks], device=logits.device).unsqueeze(1)
            thresh = kth.gather(1, idx)
            probs = torch.where(probs < thresh, torch.zeros_like(probs), probs)
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=logits.device).unsqueeze(1)
            cutoff = probs.max(dim=-1, keepdim=True).values * min_p
            probs = torch.where(probs < cutoff, torch.zeros_like(probs), probs)
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=logits.device).unsqueeze(1)
            sorted_p, order = probs.sort(dim=-1, descending=True)
            cum = sorted_p.cumsum(dim=-1)
            # keep a token while the mass before it is below top_p (so the first is always kept)
            drop = (cum - sorted_p) >= top_p * cum[:, -1:]
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
        # one uniform per row: unseeded rows draw theirs together, seeded rows from their own generator
        u = torch.rand(len(reqs), device=logits.device)
        for i, p in enumerate(params):
            if p.seed is not None and not p.greedy:
                u[i] = torch.rand((), device=logits.device, generator=self._generator(reqs[i]))
        tokens = categorical(probs, u)
        if bool(greedy.any()):
            g_rows = greedy.nonzero().view(-1)
            tokens[g_rows] = logits[g_rows].argmax(dim=-1)
        return tokens


def categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per row of the unnormalized non-negative `probs` [B, V] by inverse CDF, with `u` [B]
    uniform in [0, 1). `torch.multinomial` draws a V-wide exponential vector per row for one sample,
    and on a CPU that RNG pass costs ~30 ms for 32 rows of a 49k vocabulary (a fifth of the decode
    step); this costs a cumulative sum and a binary search."""
    cdf = probs.cumsum(dim=-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    # the first index whose cdf exceeds the target: never a zero-probability token, since the cdf
    # does not rise there
    idx = torch.searchsorted(cdf, target, right=True).view(-1)
    return idx.clamp_(max=probs.shape[1] - 1)
