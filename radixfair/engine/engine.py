"""The offline engine: `Engine(model=...).generate(...)`, with the scheduler loop in a thread.

Callers in any thread submit requests; one background thread owns the scheduler, the model
and the KV pool, so nothing in the hot loop needs a lock. Results flow back through per-request
queues, which the synchronous, streaming and asyncio front-ends all read.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from radixfair.engine.cpu_malloc import tune_malloc_for_cpu_inference
from radixfair.engine.loader import inspect_model, load_state_dict, open_gguf
from radixfair.engine.model_runner import (
    ModelRunner,
    RunnerConfig,
    auto_max_total_tokens,
    select_device,
    select_dtype,
)
from radixfair.engine.tokenizer import Tokenizer
from radixfair.engine_args import EngineArgs
from radixfair.sampling_params import SamplingParams
from radixfair.sched.batch import ScheduledBatch
from radixfair.sched.policies import PolicyConfig, make_policy
from radixfair.sched.request import Req, TokenLogprob
from radixfair.sched.scheduler import Scheduler, SchedulerConfig

logger = logging.getLogger(__name__)


@dataclass
class _Submit:
    req: Req
    sink: Callable[[dict[str, Any]], object]
    stream: bool = True  # False: only the final output goes to the sink


@dataclass
class _Abort:
    rid: str


@dataclass
class _Call:
    fn: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


_STOP = object()


class Engine:
    def __init__(self, model: str | None = None, args: EngineArgs | None = None, **kwargs: Any) -> None:
        if args is None:
            args = EngineArgs.from_kwargs(model=model, **kwargs)
        elif model is not None or kwargs:
            overrides: dict[str, Any] = dict(kwargs)
            if model is not None:
                overrides["model"] = model
            args = replace(args, **overrides)
        self.args = args
        # before the model loads: a bad policy name or weight should fail fast
        policy = make_policy(
            args.schedule_policy,
            PolicyConfig(args.w_in, args.w_out, args.dlpm_quantum, dict(args.client_weights)),
        )
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        torch.manual_seed(args.random_seed)
        files = inspect_model(args.model)
        self.model_path = files.path
        self.model_config = files.config
        self.tokenizer = (
            Tokenizer.from_gguf(open_gguf(files.path)) if files.format == "gguf" else Tokenizer.from_hf_dir(files.path)
        )
        self.device = select_device(args.device)
        if self.device.type == "cpu":
            tune_malloc_for_cpu_inference()
        self.dtype = select_dtype(args.dtype, self.device, files.config)
        state = load_state_dict(files, self.dtype)
        weight_bytes = sum(t.numel() * t.element_size() for t in state.values())
        self.context_len = min(args.context_length or files.config.max_position_embeddings,
                               files.config.max_position_embeddings)
        if args.max_total_tokens is not None:
            max_total = args.max_total_tokens
        else:
            frac = args.mem_fraction_static or (0.85 if self.device.type == "cuda" else 0.15)
            max_total = auto_max_total_tokens(files.config, self.dtype, self.device, frac, weight_bytes)
        self.max_total_tokens = max_total
        self.runner = ModelRunner(
            files.config,
            state,
            RunnerConfig(max_total, args.max_running_requests, self.context_len),
            self.dtype,
            self.device,
        )
        del state
        self.eos_token_ids = tuple(sorted(set(self.tokenizer.eos_token_ids) | set(files.config.eos_token_ids)))
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_total_tokens=max_total,
                max_running_requests=args.max_running_requests,
                max_prefill_tokens=args.max_prefill_tokens,
                chunked_prefill_size=args.chunked_prefill_size,
                max_context_len=self.context_len,
                disable_radix_cache=args.disable_radix_cache,
            ),
            policy,
        )
        self._inbox: queue.Queue[Any] = queue.Queue()
        # rid -> its submission (sink, stream): a non-streaming request gets only its final result,
        # so it costs no per-step result dict and wakes no waiting thread per token
        self._outputs: dict[str, _Submit] = {}
        self._stopped = False
        self.last_invariant: tuple[int, int, int] | None = None
        self.invariant_violations = 0
        # called on the scheduler thread after each iteration (schedule, forward pass, outputs) with
        # the batch and the iteration's wall seconds; `bench calibrate` fits the simulator's cost
        # model to these. Observers must be quick and must not raise.
        self.pass_observers: list[Callable[[ScheduledBatch, float], None]] = []
        self._thread = threading.Thread(target=self._loop, name="radixfair-scheduler", daemon=True)
        self._thread.start()

    # ---- public API ------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | SamplingParams | Sequence[dict[str, Any] | SamplingParams] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        client_id: str = "default",
        rid: str | list[str] | None = None,
        stream: bool = False,
    ) -> Any:
        """One prompt -> one result dict; a list (or `n` > 1) -> a flat list, prompt-major.
        `stream=True` -> an iterator of cumulative result dicts."""
        reqs = self.make_requests(
            prompt, sampling_params, input_ids, return_logprob, logprob_start_len, top_logprobs_num, client_id, rid
        )
        if stream:
            if len(reqs) != 1:
                raise ValueError("stream=True takes a single prompt")
            return self._stream(reqs[0])
        queues = [self._submit(r, stream=False) for r in reqs]
        results = [self._wait(q) for q in queues]
        single = isinstance(prompt, str) or (input_ids is not None and isinstance(input_ids[0], int))
        return results[0] if single and len(results) == 1 else results

    def generate_stream(self, prompt: str | None = None, **kwargs: Any) -> Iterator[dict[str, Any]]:
        return self.generate(prompt, stream=True, **kwargs)

    async def async_generate(self, req: Req, stream: bool = True) -> AsyncIterator[dict[str, Any]]:
        """Stream a prepared request's outputs into an asyncio consumer (used by the HTTP server);
        `stream=False` yields only the final output."""
        loop = asyncio.get_running_loop()
        aq: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._inbox.put(_Submit(req, lambda out: loop.call_soon_threadsafe(aq.put_nowait, out), stream))
        try:
            while True:
                out = await aq.get()
                yield out
                if out["finished"]:
                    return
        finally:
            if not req.finished:
                self.abort(req.rid)

    def make_requests(
        self,
        prompt: str | list[str] | None,
        sampling_params: Any,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        client_id: str = "default",
        rid: str | list[str] | None = None,
    ) -> list[Req]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt (text) or input_ids")
        if input_ids is not None:
            if not isinstance(input_ids, list) or not input_ids:
                raise ValueError("input_ids is empty: give at least one token id (or a list of lists)")
            ids_list = [input_ids] if isinstance(input_ids[0], int) else input_ids
            token_lists = [self._check_ids(list(x)) for x in ids_list]
        else:
            texts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ValueError("prompt must be a string or a list of strings")
            token_lists = [self.tokenizer.encode(t) for t in texts]
        n = len(token_lists)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != n:
                raise ValueError(f"{len(sampling_params)} sampling_params for {n} prompts")
            sps = [self._params(p) for p in sampling_params]
        else:
            sps = [self._params(sampling_params) for _ in range(n)]
        rids = [rid] if isinstance(rid, str) else rid
        if rids is not None and len(rids) != n:
            raise ValueError(f"{len(rids)} rids for {n} prompts")
        if top_logprobs_num < 0 or top_logprobs_num > 20:
            raise ValueError(f"top_logprobs_num must be in [0, 20], got {top_logprobs_num}")
        reqs = []
        for i, ids in enumerate(token_lists):
            base = sps[i]
            base_rid = rids[i] if rids else uuid.uuid4().hex
            # n > 1: n independent samples of the prompt, each its own request (the prompt's KV is
            # shared through the radix cache); seeded copies get seed + k so they differ
            for k in range(base.n):
                sp = base if base.n == 1 else replace(
                    base, n=1, seed=None if base.seed is None else base.seed + k,
                    stop=list(base.stop), stop_token_ids=list(base.stop_token_ids),
                )
                req = Req(
                    origin_input_ids=list(ids),
                    sampling_params=sp,
                    rid=base_rid if base.n == 1 else f"{base_rid}-{k}",
                    client_id=client_id,
                    weight=self.scheduler.policy.config.weight_of(client_id),
                    eos_token_ids=self.eos_token_ids,
                    return_logprob=return_logprob,
                    logprob_start_len=logprob_start_len,
                    top_logprobs_num=top_logprobs_num,
                    detokenizer=self.tokenizer.incremental_detokenizer(
                        ids, skip_special_tokens=sp.skip_special_tokens
                    ),
                )
                self.scheduler.validate(req)
                reqs.append(req)
        return reqs

    def _params(self, p: Any) -> SamplingParams:
        if isinstance(p, SamplingParams):
            return replace(p, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids))
        return SamplingParams.from_dict(p)

    def _check_ids(self, ids: list[int]) -> list[int]:
        vocab = self.model_config.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"input_ids must be integers in [0, {vocab}), got {t!r}")
        return ids

    def abort(self, rid: str) -> None:
        self._inbox.put(_Abort(rid))

    def flush_cache(self) -> None:
        """Empty the radix cache. Raises RuntimeError (saying why) unless the engine is idle."""
        self._call(self.scheduler.flush_cache)

    def get_stats(self) -> dict[str, Any]:
        def snap() -> dict[str, Any]:
            s = self.scheduler
            st = s.stats
            return {
                "running": len(s.running),
                "waiting": len(s.waiting),
                "input_tokens": st.input_tokens,
                "cached_tokens": st.cached_tokens,
                "hit_rate": st.hit_rate,
                "prefill_tokens": st.prefill_tokens,
                "decode_tokens": st.decode_tokens,
                "retractions": st.retractions,
                "evicted_tokens": s.tree.evicted_tokens,
                "tree_tokens": s.tree.evictable_size() + s.tree.protected_size(),
                "free_slots": s.allocator.available(),
                "max_total_tokens": s.config.max_total_tokens,
            }

        return self._call(snap)

    def check_invariant(self) -> tuple[int, int, int]:
        return self._call(self.scheduler.check_invariant)

    def wait_idle(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._call(self.scheduler.is_idle):
            if time.monotonic() > deadline:
                raise TimeoutError("engine did not become idle")
            time.sleep(0.005)

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._inbox.put(_STOP)
        self._thread.join(timeout=30)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- plumbing ------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the scheduler thread (the only thread that touches scheduler state)."""
        if self._stopped:
            raise RuntimeError("the engine is shut down")
        call = _Call(fn)
        self._inbox.put(call)
        if not call.done.wait(timeout=60):
            raise TimeoutError("the scheduler thread did not answer")
        if call.error is not None:
            raise call.error
        return call.result

    def _submit(self, req: Req, stream: bool = True) -> queue.Queue[dict[str, Any]]:
        if self._stopped:
            raise RuntimeError("the engine is shut down")
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        self._inbox.put(_Submit(req, q.put, stream))
        return q

    def _wait(self, q: queue.Queue[dict[str, Any]]) -> dict[str, Any]:
        while True:
            out = q.get()
            if out["finished"]:
                return out

    def _stream(self, req: Req) -> Iterator[dict[str, Any]]:
        q = self._submit(req)
        try:
            while True:
                out = q.get()
                yield out
                if out["finished"]:
                    return
        finally:
            if not req.finished:
                self.abort(req.rid)

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued submissions/aborts/calls. Returns False once asked to stop."""
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
            if isinstance(item, _Submit):
                req = item.req
                try:
                    if req.rid in self._outputs:
                        raise ValueError(f"duplicate request id {req.rid!r}: it is already in use")
                    self.scheduler.add_request(req)
                    self._outputs[req.rid] = item
                except ValueError as e:
                    # answer through this request's own sink: an existing request with the same
                    # rid keeps its sink
                    req.abort(str(e))
                    req.error = str(e)
                    item.sink(self.result_dict(req, True))
            elif isinstance(item, _Abort):
                self.scheduler.abort(item.rid)
            elif isinstance(item, _Call):
                try:
                    item.result = item.fn()
                except BaseException as e:
                    item.error = e
                item.done.set()
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _loop(self) -> None:
        try:
            while self._drain_inbox(block=self.scheduler.is_idle()):
                t0 = time.perf_counter()
                batch = self.scheduler.schedule()
                for req in self.scheduler.pop_dropped():
                    self._finish(req)
                if batch is None:
                    if self.scheduler.is_idle():
                        self._check_idle_invariant()
                    continue
                try:
                    out = self.runner.run(batch)
                except Exception as e:
                    logger.exception("forward pass failed; aborting the %d requests of the batch", len(batch.reqs))
                    self.scheduler.fail_batch(batch, f"internal error in the forward pass: {e}")
                    for req in batch.reqs:
                        self._finish(req)
                    continue
                finished = self.scheduler.process_output(batch, out)
                self._publish(batch, finished)
                if self.pass_observers:
                    dt = time.perf_counter() - t0
                    for observe in self.pass_observers:
                        observe(batch, dt)
        finally:
            self._fail_all("the engine shut down")

    def _publish(self, batch: ScheduledBatch, finished: list[Req]) -> None:
        done = set(map(id, finished))
        for req in batch.reqs:
            if id(req) in done:
                self._finish(req)
            elif req.output_ids and (sub := self._outputs.get(req.rid)) is not None and sub.stream:
                self._emit(req, False)

    def _finish(self, req: Req) -> None:
        self.runner.sampler.forget(req.rid)
        self._emit(req, True)

    def _emit(self, req: Req, finished: bool) -> None:
        sub = self._outputs.get(req.rid)
        if sub is None:
            return
        if finished:
            self._outputs.pop(req.rid, None)
        sub.sink(self.result_dict(req, finished))

    def result_dict(self, req: Req, finished: bool) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": req.rid,
            "prompt_tokens": len(req.origin_input_ids),
            "completion_tokens": len(req.output_ids),
            "cached_tokens": req.cached_tokens,
            "finish_reason": req.finish_reason.to_dict() if req.finish_reason else None,
            "e2e_latency": (req.finish_time or time.monotonic()) - req.arrival_time,
        }
        if req.first_token_time is not None:
            meta["ttft"] = req.first_token_time - req.arrival_time
        if req.return_logprob:
            meta["input_token_logprobs"] = [_lp(x) for x in req.input_token_logprobs]
            meta["output_token_logprobs"] = [_lp(x) for x in req.output_token_logprobs]
            if req.top_logprobs_num > 0:
                meta["input_top_logprobs"] = [_top(x) for x in req.input_token_logprobs]
                meta["output_top_logprobs"] = [_top(x) for x in req.output_token_logprobs]
        if req.error:
            meta["error"] = req.error
        return {
            "text": req.output_text(final=finished),
            "output_ids": list(req.output_ids),
            "meta_info": meta,
            "finished": finished,
            "index": 0,
        }

    def _check_idle_invariant(self) -> None:
        try:
            self.last_invariant = self.scheduler.check_invariant()
            self.scheduler.tree.check_invariant()
        except AssertionError as e:
            self.invariant_violations += 1
            logger.error("%s", e)
            if self.args.debug_invariants:
                raise

    def _fail_all(self, message: str) -> None:
        for rid, sub in list(self._outputs.items()):
            sub.sink({"finished": True, "text": "", "output_ids": [], "meta_info": {
                "id": rid, "finish_reason": {"type": "abort", "message": message}}})
        self._outputs.clear()


def _lp(x: TokenLogprob) -> tuple[float | None, int, None]:
    return (x.logprob, x.token_id, None)


def _top(x: TokenLogprob) -> list[tuple[float, int, None]] | None:
    return None if x.top is None else [(lp, t, None) for lp, t in x.top]
