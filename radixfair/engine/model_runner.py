"""The executor: owns the model, the KV pool and the sampler, and runs scheduled batches."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from radixfair.engine import native
from radixfair.engine.constrained.mask import TokenMask
from radixfair.engine.cuda_graph import CudaGraphRunner
from radixfair.engine.decode_attention import NativeDecodeAttention, native_decode_attention
from radixfair.engine.decode_workspace import DecodeWorkspace
from radixfair.engine.forward_batch import DecodeGroup, ForwardBatch, ForwardMode, PrefillSeq
from radixfair.engine.isolation import sample_isolated
from radixfair.engine.kv_pool import KVPool, ReqToTokenTable
from radixfair.engine.model_config import ModelConfig
from radixfair.engine.models.llama import LlamaForCausalLM
from radixfair.engine.quant import QuantLinear, tune_paths
from radixfair.engine.sampler import Sampler
from radixfair.sched.batch import BatchMode, BatchOutput, ScheduledBatch
from radixfair.sched.request import Req

logger = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 128  # tokens; below this a shared prefix is not worth its own matmuls
# K/V tokens a cascade group must spare the gather, (members - 1) * shared, to pay for its extra
# per-layer ops: measured on the 2-core CPU, 2 groups of 5 over 512 shared tokens ran ~15% slower
# than plain length groups and ~8k spared tokens per group broke even.
CASCADE_MIN_SAVED_TOKENS = 8192
MAX_DECODE_GROUPS = 4
MIN_DECODE_GROUP = 4  # requests
GROUP_OVERHEAD_TOKENS = 2048
# the token masks of the constrained requests among those that sample (structured outputs)
MaskFn = Callable[[Sequence[Req]], TokenMask | None]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def select_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def select_dtype(dtype: str, device: torch.device, config: ModelConfig) -> torch.dtype:
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.float16 if config.torch_dtype == "float16" else torch.bfloat16
    # bf16 matmuls run 2-3x faster than float32 on CPUs with native bf16 (AVX512-BF16, AMX);
    # elsewhere they are emulated and slower, so float32 wins there
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX. (oneDNN's own check also says yes for plain AVX512, where bf16 matmuls are
    emulated and run ~4x slower than float32 ones: measured on an AVX512 Xeon without AVX512-BF16.)"""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False


@dataclass(frozen=True)
class RunnerConfig:
    max_total_tokens: int
    max_running_requests: int
    max_context_len: int
    quantization: str = "none"  # none | int8 | int4 (resolved: see quant.resolve_quantization)
    # every quantized layer's route ((first pass size in tokens, path) ascending from 1, see
    # QuantLinear.set_route); None: each layer shape's route is measured at load
    quant_route: tuple[tuple[int, str], ...] | None = None
    torch_compile: bool = False  # --enable-torch-compile
    cuda_graph_max_bs: int = 0  # decode batches up to this replay captured CUDA graphs; 0: never
    # bound (rows x capacity, tokens) of the contiguous decode K/V workspace; 0: decode gathers from the pool
    decode_workspace_tokens: int = 0
    # quantized layers may multiply their codes by int8 activations (W8A8, VNNI) where that is faster
    activation_quant: bool = True
    # tokens of a text whose activations set the int8 activations' smoothing (none: unsmoothed)
    calibration_ids: tuple[int, ...] = ()
    # CPU passes of at most this many tokens run on one thread (0: never)
    single_thread_pass_tokens: int = 0


def auto_max_total_tokens(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, mem_fraction: float, weight_bytes: int
) -> int:
    """KV slots that fit in `mem_fraction` of the device's memory after the weights."""
    per_token = KVPool.bytes_per_token(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = total * mem_fraction - (total - free)
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        budget = total * mem_fraction - weight_bytes
    tokens = int(budget // per_token)
    if tokens < 256:
        raise ValueError(
            f"only {max(tokens, 0)} KV slots fit in --mem-fraction-static {mem_fraction}; raise it or "
            f"set --max-total-tokens"
        )
    return tokens


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        state_dict: dict[str, torch.Tensor],
        runner_config: RunnerConfig,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.config = model_config
        self.device = device
        self.dtype = dtype
        # torch's threads as configured (read here, on the thread that set them: a pass may lower the
        # count on the thread that runs it, see `_pass_threads`)
        self.threads = torch.get_num_threads()
        self.single_thread_tokens = runner_config.single_thread_pass_tokens if device.type == "cpu" else 0
        torch.manual_seed(0)
        with torch.device("meta"):
            model = LlamaForCausalLM(model_config)
        model = model.to_empty(device=device).to(dtype)
        model.rotary = model.rotary.__class__(model_config).to(device)  # buffers were on meta
        model.load_hf_state_dict(state_dict)
        model.eval()
        self.model = model
        self.kv = KVPool(
            runner_config.max_total_tokens,
            model_config.num_hidden_layers,
            model_config.num_key_value_heads,
            model_config.head_dim,
            dtype,
            device,
        )
        self.quant_layers: list[QuantLinear] = []
        if runner_config.quantization != "none":
            self._quantize(runner_config)
        if runner_config.torch_compile:
            self.model.compile_layers()
        self.req_to_token = ReqToTokenTable(
            runner_config.max_running_requests + 1, runner_config.max_context_len, device
        )
        self.graphs: CudaGraphRunner | None = None
        if runner_config.cuda_graph_max_bs > 0 and device.type == "cuda":
            self.graphs = CudaGraphRunner(self.model, self.kv,
                                          min(runner_config.cuda_graph_max_bs, runner_config.max_running_requests),
                                          runner_config.max_context_len)
        # captured graphs address the pool directly: with them, eager decode steps keep the gather too
        self.workspace: DecodeWorkspace | None = None
        if runner_config.decode_workspace_tokens > 0 and self.graphs is None:
            native = (native_decode_attention() is not None and NativeDecodeAttention.supports(
                model_config.num_attention_heads, model_config.num_key_value_heads, model_config.head_dim,
                dtype, device))
            self.workspace = DecodeWorkspace(self.kv, runner_config.decode_workspace_tokens, native)
        self.sampler = Sampler(device)
        self.vocab_size = model_config.vocab_size
        self.token_masks: MaskFn | None = None  # set by the engine when structured outputs are on

    def _quantize(self, cfg: RunnerConfig) -> None:
        route = cfg.quant_route
        paths = {"vnni", "w8a8", "dense"} if route is None else {p for _, p in route}
        w8a8 = "w8a8" in paths and cfg.activation_quant
        stats = self._input_absmax(cfg.calibration_ids) if w8a8 and cfg.calibration_ids else None
        self.quant_layers = self.model.quantize(cfg.quantization, keep_dense="dense" in paths, w8a8=w8a8,
                                                act_absmax=stats, vnni="vnni" in paths and cfg.activation_quant)
        if route is not None:
            for q in self.quant_layers:
                q.set_route(route)
            return
        t = time.perf_counter()
        # a path is timed on the threads a pass of its size will run on
        threads = self._pass_threads if self.single_thread_tokens else None
        try:
            routes = tune_paths(self.quant_layers, pass_threads=threads)
        finally:
            if threads is not None:
                threads(self.single_thread_tokens + 1)
        logger.info("quantized layers' paths by pass size (tokens), measured in %.1f s: %s",
                    time.perf_counter() - t,
                    "; ".join(f"{n}x{k} {kind}: " + ", ".join(f"{p} from {r}" for r, p in rt)
                              for (n, k, kind), rt in routes.items()))

    def _input_absmax(self, ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """The projections' input channel maxima over one prefill of `ids` (on scratch KV slots:
        the pool is empty at load)."""
        n = min(len(ids), self.kv.size)
        ids_t = torch.tensor(list(ids[:n]), dtype=torch.long, device=self.device)
        positions = torch.arange(n, device=self.device)
        batch = ForwardBatch(mode=ForwardMode.PREFILL, input_ids=ids_t, positions=positions, out_slots=positions,
                             logits_index=positions[-1:], seqs=[PrefillSeq(0, n, 0, None, None)])
        return self.model.input_absmax(batch, self.kv)

    def copy_bytes(self) -> int:
        """Memory the quantized layers' copies for large batches (dense, int8) take beside their codes."""
        return sum(q.copy_bytes() for q in self.quant_layers)

    def path_rows(self) -> dict[str, int]:
        """The smallest pass (tokens) from which some quantized layer takes each path."""
        out: dict[str, int] = {}
        for q in self.quant_layers:
            for rows, path in q.route:
                out[path] = min(out.get(path, rows), rows)
        return out

    def forget(self, rid: str) -> None:
        """`rid` finished: drop what the executor kept for it (a seeded request's RNG)."""
        self.sampler.forget(rid)
        if self.workspace is not None:
            self.workspace.drop_finished()

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device, non_blocking=True)

    def _pass_threads(self, tokens: int) -> None:
        """One thread for a small CPU pass: its hundreds of small ops (and even its weight streaming,
        on a few cores) lose more to waking and joining the other threads than they gain."""
        n = 1 if tokens <= self.single_thread_tokens else self.threads
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        native.set_threads(n)

    def run(self, batch: ScheduledBatch) -> BatchOutput:
        if self.single_thread_tokens:
            self._pass_threads(batch.num_tokens)
        fb = self._prepare(batch)
        logits = self.graphs.run(fb) if self.graphs is not None else None
        if logits is None:
            logits = self.model(fb, self.kv)
        if fb.workspace is not None and self.workspace is not None:
            self.workspace.commit()
        # after the launch: on an asynchronous device the masks are computed while the model runs
        masks = self.token_masks
        mask = masks([r for r, s in zip(batch.reqs, batch.sample, strict=True) if s]) if masks else None
        return self._postprocess(batch, logits, mask)

    # ---- batch preparation ---------------------------------------------------------------------
    def _prepare(self, batch: ScheduledBatch) -> ForwardBatch:
        if batch.mode is BatchMode.MIXED:
            return self._prepare_mixed(batch)
        table = self.req_to_token.table
        for row, slots in batch.row_updates:
            table[row, : len(slots)] = self._tensor(slots)
            if self.workspace is not None:
                self.workspace.invalidate(row)
        input_ids = self._tensor(batch.input_ids)
        positions = self._tensor(batch.positions)
        out_slots = self._tensor(batch.out_slots)
        if batch.mode is BatchMode.DECODE:
            rows = self._tensor(batch.rows)
            logits_index = torch.arange(len(batch.reqs), device=self.device)
            if len(batch.input_ids) != len(batch.reqs):
                # requests with forced (jump-forward) tokens have one query row per token, each
                # attending to its own causal length through the table: decode rows like any other
                counts = self._tensor(batch.extend_lens)
                rows = rows.repeat_interleave(counts)
                logits_index = torch.cumsum(counts, 0) - 1
            table[rows, positions] = out_slots
            ws = None
            if self.workspace is not None and len(batch.input_ids) == len(batch.reqs):
                ws = self.workspace.prepare(batch.reqs, batch.rows.tolist(), batch.positions.tolist(), table)
            return ForwardBatch(
                mode=ForwardMode.DECODE,
                input_ids=input_ids,
                positions=positions,
                out_slots=out_slots,
                logits_index=logits_index,
                decode_groups=self._decode_groups(batch, rows) if ws is None else None,
                workspace=ws,
            )
        seqs: list[PrefillSeq] = []
        logits_pos: list[np.ndarray] = []
        q_start = 0
        for i, req_slots in enumerate(batch.row_slots):
            row = int(batch.rows[i])
            prefix = int(batch.prefix_lens[i])
            ext = int(batch.extend_lens[i])
            total = prefix + ext
            slots_t = self._tensor(req_slots[:total])
            table[row, :total] = slots_t
            if self.workspace is not None:
                self.workspace.invalidate(row)
            seqs.append(PrefillSeq(q_start, ext, prefix, slots_t if prefix > 0 else None,
                                   self._offset_causal_mask(prefix, ext) if prefix > 0 else None))
            lp = batch.logprob_positions[i] if batch.logprob_positions else None
            if lp is not None:
                logits_pos.append(lp[0] + q_start)
            if batch.sample[i]:
                logits_pos.append(np.asarray([q_start + ext - 1], dtype=np.int64))
            q_start += ext
        index = np.concatenate(logits_pos) if logits_pos else np.zeros(0, dtype=np.int64)
        return ForwardBatch(
            mode=ForwardMode.PREFILL,
            input_ids=input_ids,
            positions=positions,
            out_slots=out_slots,
            logits_index=self._tensor(index),
            seqs=seqs,
        )

    def _prepare_mixed(self, batch: ScheduledBatch) -> ForwardBatch:
        """Prefill tokens first, decode rows after: each part prepared as its own batch would be."""
        prefill, decode = batch.split_mixed()
        p = self._prepare(prefill)
        d = self._prepare(decode)
        start = len(prefill.input_ids)
        return ForwardBatch(
            mode=ForwardMode.MIXED,
            input_ids=torch.cat((p.input_ids, d.input_ids)),
            positions=torch.cat((p.positions, d.positions)),
            out_slots=torch.cat((p.out_slots, d.out_slots)),
            logits_index=torch.cat((p.logits_index, d.logits_index + start)),
            decode_groups=d.decode_groups,
            seqs=p.seqs,
            decode_start=start,
            workspace=d.workspace,
        )

    def _offset_causal_mask(self, prefix: int, q_len: int) -> torch.Tensor:
        qpos = torch.arange(q_len, device=self.device).unsqueeze(1) + prefix
        allowed = torch.arange(prefix + q_len, device=self.device).unsqueeze(0) <= qpos
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, float("-inf"))

    def _decode_groups(self, batch: ScheduledBatch, rows: torch.Tensor) -> list[DecodeGroup]:
        """Requests sharing a long prefix form cascade groups; the rest are split by length."""
        if len(rows) != len(batch.reqs):  # forced tokens: rows are tokens, cascade groups are requests
            return self._length_groups(batch, rows, None)
        groups, rest = self._cascade_groups(batch, rows)
        if not groups:
            return self._length_groups(batch, rows, None)
        return groups + self._length_groups(batch, rows, rest)

    def _cascade_groups(
        self, batch: ScheduledBatch, rows: torch.Tensor
    ) -> tuple[list[DecodeGroup], np.ndarray]:
        """Requests whose first `MIN_SHARED_PREFIX`+ slots are the same (they matched the same radix
        tree path: one document, many questions) attend to that prefix as one operand.
        Returns the groups and the batch indices left for plain groups."""
        everyone = np.arange(len(batch.reqs))
        if not batch.row_slots or len(batch.reqs) < 2:
            return [], everyone
        # A slot holds one position of one tree path, so two sequences with the same slot at
        # position MIN_SHARED_PREFIX - 1 share at least their first MIN_SHARED_PREFIX tokens.
        by_anchor: dict[int, list[int]] = {}
        for i, slots in enumerate(batch.row_slots):
            if len(slots) > MIN_SHARED_PREFIX:
                by_anchor.setdefault(int(slots[MIN_SHARED_PREFIX - 1]), []).append(i)
        groups: list[DecodeGroup] = []
        used = np.zeros(len(batch.reqs), dtype=bool)
        seq_lens = batch.positions + 1
        for members in by_anchor.values():
            if len(members) < 2:
                continue
            ref = batch.row_slots[members[0]]
            shared = min(len(batch.row_slots[i]) for i in members) - 1  # each keeps >= 1 own token
            for i in members[1:]:
                other = batch.row_slots[i][:shared]
                diff = np.flatnonzero(other != ref[: len(other)])
                if len(diff):
                    shared = int(diff[0])
            if shared < MIN_SHARED_PREFIX or (len(members) - 1) * shared < CASCADE_MIN_SAVED_TOKENS:
                continue
            idx_np = np.asarray(members, dtype=np.int64)
            own = seq_lens[idx_np] - shared
            idx = self._tensor(idx_np)
            g_rows = rows.index_select(0, idx)
            lmax = int(own.max())
            kv_index = self.req_to_token.table[g_rows, shared : shared + lmax]
            cols = torch.arange(lmax, device=self.device)
            valid = cols.unsqueeze(0) < self._tensor(own).unsqueeze(1)
            kv_mask = torch.where(valid, 0.0, float("-inf")).view(1, len(members), 1, lmax)
            shared_index = self._tensor(np.ascontiguousarray(ref[:shared]))
            groups.append(DecodeGroup(idx, kv_index, kv_mask, shared_index))
            used[idx_np] = True
        return groups, np.flatnonzero(~used)

    def _length_groups(self, batch: ScheduledBatch, rows: torch.Tensor, subset: np.ndarray | None) -> list[DecodeGroup]:
        """Plain padded groups for the batch (or `subset` of its indices), split by length so that
        short sequences are not padded to the longest.

        Decode attention gathers and multiplies `B x Lmax` K/V entries; with lengths spread over
        a wide range most of that is padding. Each extra group costs a few small kernels per
        layer, worth about `GROUP_OVERHEAD_TOKENS` padded entries.
        """
        all_lens = batch.positions + 1
        if subset is not None and len(subset) == 0:
            return []
        members = np.arange(len(all_lens)) if subset is None else subset
        seq_lens = all_lens[members]
        order = np.argsort(seq_lens, kind="stable")
        lens_sorted = seq_lens[order]
        b = len(order)
        best_k, best_cost = 1, b * int(lens_sorted[-1])
        for k in range(2, min(MAX_DECODE_GROUPS, b // MIN_DECODE_GROUP) + 1):
            bounds = np.linspace(0, b, k + 1).astype(int)
            cost = sum((bounds[i + 1] - bounds[i]) * int(lens_sorted[bounds[i + 1] - 1]) for i in range(k))
            cost += (k - 1) * GROUP_OVERHEAD_TOKENS
            if cost < best_cost:
                best_k, best_cost = k, cost
        if best_k == 1 and subset is None:
            return [self._group(None, rows, int(lens_sorted[-1]), self._tensor(seq_lens))]
        groups = []
        bounds = np.linspace(0, b, best_k + 1).astype(int)
        for i in range(best_k):
            idx_np = members[order[bounds[i] : bounds[i + 1]]]
            idx = self._tensor(idx_np)
            groups.append(self._group(idx, rows.index_select(0, idx), int(all_lens[idx_np].max()),
                                      self._tensor(all_lens[idx_np])))
        return groups

    def _group(self, idx: torch.Tensor | None, rows: torch.Tensor, lmax: int, seq_lens: torch.Tensor) -> DecodeGroup:
        kv_index = self.req_to_token.table[rows, :lmax]
        cols = torch.arange(lmax, device=self.device)
        valid = cols.unsqueeze(0) < seq_lens.unsqueeze(1)
        kv_mask = torch.where(valid, 0.0, float("-inf")).view(1, len(rows), 1, lmax)
        return DecodeGroup(idx, kv_index, kv_mask)

    # ---- sampling and logprobs -----------------------------------------------------------------
    def _postprocess(self, batch: ScheduledBatch, logits: torch.Tensor, mask: TokenMask | None = None) -> BatchOutput:
        n = len(batch.reqs)
        next_ids = [-1] * n
        next_lps: list[float | None] = [None] * n
        next_tops: list[list[tuple[float, int]] | None] = [None] * n
        in_lps: list[list[float] | None] = [None] * n
        in_tops: list[list[list[tuple[float, int]]] | None] = [None] * n
        sample_rows: list[int] = []
        sample_reqs = []
        failed: dict[int, str] = {}
        offset = 0
        for i, req in enumerate(batch.reqs):
            lp = batch.logprob_positions[i] if batch.logprob_positions else None
            if lp is not None:
                k = len(lp[0])
                chunk = torch.log_softmax(logits[offset : offset + k], dim=-1)
                targets = self._tensor(lp[1]).view(-1, 1)
                in_lps[i] = chunk.gather(1, targets).view(-1).tolist()
                if req.top_logprobs_num > 0:
                    v, ix = chunk.topk(req.top_logprobs_num, dim=-1)
                    in_tops[i] = [list(zip(a, b, strict=True)) for a, b in zip(v.tolist(), ix.tolist(), strict=True)]
                offset += k
            if batch.sample[i]:
                sample_rows.append(offset)
                sample_reqs.append(req)
                offset += 1
        if sample_reqs:
            rows = logits if len(sample_rows) == logits.shape[0] else logits[self._tensor(np.asarray(sample_rows))]
            res, failed_rows = sample_isolated(self.sampler, rows, sample_reqs, mask)
            j = 0
            for i in range(n):
                if batch.sample[i]:
                    next_ids[i] = res.token_ids[j]
                    if res.logprobs is not None:
                        next_lps[i] = res.logprobs[j]
                    if res.top_logprobs is not None:
                        next_tops[i] = res.top_logprobs[j]
                    if j in failed_rows:
                        failed[i] = failed_rows[j]
                    j += 1
        return BatchOutput(next_ids, next_lps, next_tops, in_lps, in_tops, failed)
