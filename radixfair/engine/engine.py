"""The engine: `Engine(model=...)`, with the scheduler loop in a thread.

Callers in any thread hand it `TokenizedRequest`s (see radixfair.io_struct: the only types that
cross this boundary) and get `EngineOutput`s back through a sink; one background thread owns the
scheduler, the model and the KV pool, so nothing in the hot loop needs a lock. `generate` is
SGLang's offline API on top (dicts in SGLang's shape), `generate_async` the asyncio one.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch

from radixfair.engine.constrained.base import Grammar
from radixfair.engine.constrained.grammar_manager import GrammarManager, make_backend
from radixfair.engine.cpu_malloc import tune_malloc_for_cpu_inference
from radixfair.engine.loaders import load_state_dict, weight_types
from radixfair.engine.model_runner import (
    ModelRunner,
    RunnerConfig,
    auto_max_total_tokens,
    select_device,
    select_dtype,
)
from radixfair.engine.model_source import find_model, model_names, open_tokenizer
from radixfair.engine.quant import resolve_quantization
from radixfair.engine.w8a8 import CALIBRATION_TEXT
from radixfair.engine_args import EngineArgs
from radixfair.io_struct import (
    EngineOutput,
    EngineRequest,
    EngineStats,
    EngineUnavailable,
    ErrorKind,
    FinishReason,
    RequestError,
    TokenizedRequest,
    build_requests,
    default_input_logprobs,
    request_key,
    result_for,
)
from radixfair.sampling_params import SamplingParams, is_utf8
from radixfair.sched.batch import ScheduledBatch
from radixfair.sched.policies import make_policy
from radixfair.sched.request import Req
from radixfair.sched.scheduler import Scheduler, fit_max_new_tokens
from radixfair.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


Sink = Callable[[EngineOutput], object]


@dataclass
class _Submission:
    """A request the engine thread serves, with how much of it its caller has been sent."""

    treq: TokenizedRequest
    sink: Sink
    req: Req | None = None  # set once the engine thread built it
    error: RequestError | None = None
    sent_text: int = 0
    sent_tokens: int = 0
    sent_output_logprobs: int = 0
    sent_input_logprobs: int = 0


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

# what a caller is told when the engine thread dies; the exception itself goes to the log
ENGINE_FAILED = "the engine stopped after an internal error"
MODEL_FAILED = "internal error while running the model"


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
        self.limits = args.request_limits()
        # before the model loads: a bad policy name or weight should fail fast
        policy = make_policy(args.schedule_policy, args.policy_config())
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        torch.manual_seed(args.random_seed)
        if args.trust_remote_code:
            logger.warning("--trust-remote-code has no effect: radixfair never runs code from a model repository")
        files = find_model(args)
        self.model_path = files.path
        self.model_names = model_names(args, files)
        self.model_config = files.config
        self.tokenizer: Tokenizer = open_tokenizer(args, files)
        self.device = select_device(args.device)
        self.eos_token_ids = tuple(sorted(set(self.tokenizer.eos_token_ids) | set(files.config.eos_token_ids)))
        # before the model loads: a grammar library that is not installed should fail fast
        self.grammar = GrammarManager(
            make_backend(args.grammar_backend, self.tokenizer, files.config.vocab_size, self.eos_token_ids),
            self.tokenizer, files.config.vocab_size, self.eos_token_ids, self.device,
            jump_forward=not args.disable_regex_jump_forward, compile_timeout_s=args.grammar_compile_timeout)
        if self.device.type == "cpu":
            tune_malloc_for_cpu_inference()
        self.dtype = select_dtype(args.dtype, self.device, files.config)
        self.quantization = resolve_quantization(args.quantization, files.format, weight_types(files))
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
            RunnerConfig(max_total, args.max_running_requests, self.context_len, self.quantization.mode,
                         args.quant_route, args.enable_torch_compile,
                         0 if args.disable_cuda_graph else args.cuda_graph_max_bs, args.decode_workspace_tokens,
                         not args.disable_activation_quant, tuple(self.tokenizer.encode(CALIBRATION_TEXT)),
                         args.single_thread_pass_tokens),
            self.dtype,
            self.device,
        )
        del state
        logger.info("loaded %s on %s: %s, quantization %s (%s), %.0f MB of weights read per batch-1 decode step%s",
                    self.model_names.source, self.device, str(self.dtype).replace("torch.", ""),
                    self.quantization.mode, self.quantization.reason,
                    self.runner.model.weight_bytes_per_decode_step() / 1e6, self._copies_note())
        if self.grammar.backend is not None:
            self.runner.token_masks = self.grammar.masks
        self.scheduler_config = args.scheduler_config(max_total, self.context_len)
        self.scheduler = Scheduler(self.scheduler_config, policy)
        self._inbox: queue.Queue[Any] = queue.Queue()
        # request key (client, rid) -> its submission: a non-streaming request is sent only its final
        # output, so it costs no per-step output and wakes no waiting thread per token
        self._subs: dict[str, _Submission] = {}
        self._stopped = False
        # held while checking `_stopped` and queueing, so nothing is queued after the final drain,
        # and while changing `_live`
        self._submit_lock = threading.Lock()
        # keys of the requests submitted and not yet answered in full: a duplicate is refused at once,
        # and `abort` can tell whether a request was live
        self._live: dict[str, tuple[str, str]] = {}  # key -> (client_id, rid)
        self.failure: str | None = None  # why the engine thread died, if it did
        self.stopped = threading.Event()  # set once the engine thread has ended
        self.invariant_violations = 0
        # called on the scheduler thread after each iteration (schedule, forward pass, outputs) with
        # the batch and the iteration's wall seconds; `bench calibrate` fits the simulator's cost
        # model to these. Observers must be quick and must not raise.
        self.pass_observers: list[Callable[[ScheduledBatch, float], None]] = []
        self._thread = threading.Thread(target=self._loop, name="radixfair-scheduler", daemon=True)
        self._thread.start()

    def _copies_note(self) -> str:
        extra = self.runner.copy_bytes()
        paths = {p: r for p, r in self.runner.path_rows().items() if p != "weight_only"}
        if not paths:
            return ""
        names = {"w8a8": "int8 x int8", "vnni": "VNNI int8-activation kernels"}
        where = ", ".join(f"{names.get(p, p)} from {r} tokens" for p, r in sorted(paths.items(), key=lambda pr: pr[1]))
        return f"; passes beside the weight-only kernels: {where}; their copies take {extra / 1e6:.0f} MB more"

    # ---- the contract: EngineRequest -> TokenizedRequest -> EngineOutput ------------------------
    def tokenize(self, req: EngineRequest) -> TokenizedRequest:
        """Check `req` against the model and tokenize it; ValueError names what cannot be served.
        Safe from any thread (it reads only immutable state), and may be slow for a long text: an
        event loop should run it in a worker thread."""
        if req.input_ids is not None:
            ids = tuple(req.input_ids)
            vocab = self.model_config.vocab_size
            for t in ids:
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                    raise ValueError(f"input_ids must be integers in [0, {vocab}), got {t!r}")
        else:
            assert req.text is not None
            if not is_utf8(req.text):
                raise ValueError("text: not valid Unicode (a lone surrogate such as \\ud800)")
            ids = tuple(self.tokenizer.encode(req.text))
        return self._fit(req, ids)

    def tokenize_all(self, reqs: Sequence[EngineRequest]) -> list[TokenizedRequest]:
        """`tokenize` for every request of one call, and the call's limits on its totals
        (`RequestLimits.check_tokenized`). The samples of a prompt (`n` > 1) share its tokenization."""
        out: list[TokenizedRequest] = []
        prev: TokenizedRequest | None = None
        for r in reqs:
            if prev is not None and (r.text if r.text is not None else r.input_ids) is (
                    prev.request.text if prev.request.text is not None else prev.request.input_ids):
                out.append(self._fit(r, prev.input_ids))
            else:
                out.append(self.tokenize(r))
            prev = out[-1]
        self.limits.check_tokenized(out)
        return out

    def _fit(self, req: EngineRequest, ids: tuple[int, ...]) -> TokenizedRequest:
        sp = req.sampling_params
        fitted = fit_max_new_tokens(len(ids), sp.max_new_tokens, self.scheduler_config)
        if fitted != sp.max_new_tokens:
            sp = sp.replace(max_new_tokens=fitted, min_new_tokens=min(sp.min_new_tokens, fitted))
        grammar = self.grammar.check(sp)  # compiled here, off the engine thread (cached by its text)
        return TokenizedRequest(req, ids, sp, grammar)

    def submit(self, treq: TokenizedRequest, sink: Sink) -> None:
        """Queue `treq`; its outputs go to `sink`, called on the engine thread (it must be quick; what
        it raises is logged). A streaming request gets an output per step, others only the last one.
        A request id its client already has in flight is answered at once, through `sink`, with an
        INVALID_REQUEST error. Raises EngineUnavailable once the engine has stopped."""
        r = treq.request
        key = request_key(r.client_id, r.rid)
        with self._submit_lock:
            if self._stopped:
                raise EngineUnavailable(self._stopped_message())
            duplicate = key in self._live
            if not duplicate:
                self._live[key] = (r.client_id, r.rid)
                self._inbox.put(_Submission(treq, sink))
        if duplicate:
            message = f"rid: duplicate request id {r.rid!r}: another of your requests in flight uses it"
            _send(sink, EngineOutput(r.rid, "", (), finish_reason=FinishReason("abort", message=message),
                                     error=RequestError(ErrorKind.INVALID_REQUEST, message)))

    def in_flight(self, client_id: str, rid: str) -> bool:
        """Whether `client_id` has a request `rid` submitted and not yet answered in full."""
        with self._submit_lock:
            return request_key(client_id, rid) in self._live

    @property
    def alive(self) -> bool:
        """Whether the engine takes requests: not shut down, and its thread has not died."""
        return not self._stopped and self._thread.is_alive()

    def _stopped_message(self) -> str:
        return ENGINE_FAILED if self.failure is not None else "the engine is shut down"

    async def generate_async(self, req: EngineRequest | TokenizedRequest) -> AsyncGenerator[EngineOutput, None]:
        """The outputs of one request, for an asyncio consumer; leaving early aborts the request."""
        treq = req if isinstance(req, TokenizedRequest) else await asyncio.to_thread(self.tokenize, req)
        loop = asyncio.get_running_loop()
        aq: asyncio.Queue[EngineOutput] = asyncio.Queue()
        try:
            self.submit(treq, lambda out: loop.call_soon_threadsafe(aq.put_nowait, out))
        except EngineUnavailable as e:
            # answered like a request the engine failed in flight, so a consumer has one path
            yield EngineOutput(treq.rid, "", (), finish_reason=FinishReason("abort", message=str(e)),
                               error=RequestError(ErrorKind.UNAVAILABLE, str(e)))
            return
        done = False
        try:
            while not done:
                out = await aq.get()
                done = out.finished
                yield out
        finally:
            if not done:
                self.abort(treq.rid, treq.request.client_id)

    def abort(self, rid: str, client_id: str | None = None) -> bool:
        """Abort the request `rid` of `client_id` (None: of any client, for in-process callers);
        returns whether there was such a request in flight. Its caller gets its last output, with
        finish reason `abort`."""
        with self._submit_lock:
            if client_id is not None:
                keys = [request_key(client_id, rid)] if request_key(client_id, rid) in self._live else []
            else:
                keys = [k for k, (_, r) in self._live.items() if r == rid]
        for key in keys:
            self._inbox.put(_Abort(key))
        return bool(keys)

    # ---- SGLang's offline API --------------------------------------------------------------------
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
        """One prompt -> one result dict (`text`, `output_ids`, `meta_info`); a list (or `n` > 1) ->
        a flat list, prompt-major. `stream=True` -> an iterator of cumulative result dicts."""
        reqs, single = build_requests(prompt, input_ids, sampling_params, rid, client_id, return_logprob,
                                      logprob_start_len, top_logprobs_num, stream, self.limits)
        treqs = self.tokenize_all(reqs)  # all checked before any is queued
        if stream:
            if len(treqs) != 1:
                raise ValueError("stream=True takes a single prompt")
            return self._stream(treqs[0])
        queues = []
        for treq in treqs:
            q: queue.Queue[EngineOutput] = queue.Queue()
            self.submit(treq, q.put)
            queues.append(q)
        results = []
        for treq, q in zip(treqs, queues, strict=True):
            res = result_for(treq.request)
            while not res.finished:
                res.add(q.get())
            results.append(res.to_dict())
        return results[0] if single and len(results) == 1 else results

    def _stream(self, treq: TokenizedRequest) -> Iterator[dict[str, Any]]:
        q: queue.Queue[EngineOutput] = queue.Queue()
        self.submit(treq, q.put)
        res = result_for(treq.request)
        try:
            while not res.finished:
                res.add(q.get())
                yield res.to_dict()
        finally:
            if not res.finished:
                self.abort(treq.rid, treq.request.client_id)

    # ---- control and introspection ---------------------------------------------------------------
    def flush_cache(self) -> None:
        """Empty the radix cache. Raises RuntimeError (saying why) unless the engine is idle."""
        self._call(self.scheduler.flush_cache)

    def get_stats(self) -> EngineStats:
        return self._call(self.scheduler.stats)

    def check_invariant(self) -> tuple[int, int, int]:
        """(free, evictable, protected) KV slots; AssertionError unless they add up to the pool."""
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
        self.grammar.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- the engine thread -----------------------------------------------------------------------
    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the scheduler thread (the only thread that touches scheduler state)."""
        call = _Call(fn)
        with self._submit_lock:
            if self._stopped:
                raise EngineUnavailable(self._stopped_message())
            self._inbox.put(call)
        if not call.done.wait(timeout=60):
            raise TimeoutError("the scheduler thread did not answer")
        if call.error is not None:
            raise call.error
        return call.result

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued submissions/aborts/calls. Returns False once asked to stop."""
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
            if isinstance(item, _Submission):
                self._admit(item)
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

    def _admit(self, sub: _Submission) -> None:
        treq = sub.treq
        r = treq.request
        key = request_key(r.client_id, r.rid)  # unique among live requests: submit saw to it
        sp = treq.sampling_params
        sub.req = Req(
            origin_input_ids=list(treq.input_ids),
            sampling_params=sp,
            rid=key,
            client_id=r.client_id,
            eos_token_ids=self.eos_token_ids,
            return_logprob=r.return_logprob,
            logprob_start_len=r.logprob_start_len,
            top_logprobs_num=r.top_logprobs_num,
            detokenizer=self.tokenizer.incremental_detokenizer(treq.input_ids,
                                                               skip_special_tokens=sp.skip_special_tokens),
        )
        # SGLang answers `return_logprob` without a start with one prompt entry, (None, last token)
        sub.req.input_token_logprobs.extend(default_input_logprobs(treq))
        if treq.grammar is not None and sp.max_new_tokens > 0:
            constraint = self.grammar.constraint(cast(Grammar, treq.grammar), r.return_logprob)
            sub.req.constraint = constraint
            # what the grammar forces before the first sample is computed with the prompt
            sub.req.append_forced(constraint.start())
        self._subs[key] = sub
        self.scheduler.add_request(sub.req)

    def _loop(self) -> None:
        message = "the engine shut down"
        try:
            self._serve()
        except BaseException:
            # anything outside the model call (the scheduler, a policy, the bookkeeping): the engine's
            # state can no longer be trusted, so it stops, and says so to everyone waiting on it
            logger.exception("the engine thread failed; failing every request in flight or queued")
            self.failure = message = ENGINE_FAILED
        finally:
            self._fail_all(message)
            self.stopped.set()

    def _serve(self) -> None:
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
            except Exception:
                logger.exception("forward pass failed; aborting the %d requests of the batch", len(batch.reqs))
                self.scheduler.fail_batch(batch, MODEL_FAILED)
                for req in batch.reqs:
                    self._finish(req, RequestError(ErrorKind.INTERNAL, MODEL_FAILED))
                continue
            finished = self.scheduler.process_output(batch, out)
            self._publish(batch, finished)
            if self.pass_observers:
                dt = time.perf_counter() - t0
                for observe in self.pass_observers:
                    observe(batch, dt)

    def _publish(self, batch: ScheduledBatch, finished: list[Req]) -> None:
        done = set(map(id, finished))
        for req in batch.reqs:
            if id(req) in done:
                self._finish(req)
            elif req.output_ids and (sub := self._subs.get(req.rid)) is not None and sub.treq.request.stream:
                _send(sub.sink, self._output(sub, req, False))

    def _finish(self, req: Req, error: RequestError | None = None) -> None:
        self.runner.forget(req.rid)
        sub = self._subs.pop(req.rid, None)
        if sub is None:
            return
        with self._submit_lock:
            self._live.pop(req.rid, None)
        if error is None and req.error is not None:
            error = RequestError(ErrorKind.INTERNAL, req.error)
        sub.error = error
        _send(sub.sink, self._output(sub, req, True))

    @staticmethod
    def _output(sub: _Submission, req: Req, finished: bool) -> EngineOutput:
        """What `sub`'s caller has not been sent yet: constant work per step however long the output."""
        text = req.output_text(final=finished)
        n_out, n_olp, n_ilp = len(req.output_ids), len(req.output_token_logprobs), len(req.input_token_logprobs)
        out = EngineOutput(
            rid=sub.treq.rid,
            text=text[sub.sent_text:],
            token_ids=tuple(req.output_ids[sub.sent_tokens:]),
            output_logprobs=tuple(req.output_token_logprobs[sub.sent_output_logprobs:]),
            input_logprobs=tuple(req.input_token_logprobs[sub.sent_input_logprobs:]),
            prompt_tokens=len(req.origin_input_ids),
            completion_tokens=n_out,
            cached_tokens=req.cached_tokens,
            forced_tokens=req.forced_tokens,
            finish_reason=req.finish_reason if finished else None,
            error=sub.error,
            ttft=None if req.first_token_time is None else req.first_token_time - req.arrival_time,
            e2e_latency=(req.finish_time or time.monotonic()) - req.arrival_time,
        )
        sub.sent_text, sub.sent_tokens = len(text), n_out
        sub.sent_output_logprobs, sub.sent_input_logprobs = n_olp, n_ilp
        return out

    def _check_idle_invariant(self) -> None:
        try:
            self.scheduler.check_invariant()
        except AssertionError as e:
            self.invariant_violations += 1
            logger.error("%s", e)
            if self.args.debug_invariants:
                raise

    def _fail_all(self, message: str) -> None:
        """Answer everything still in flight or queued: nobody may wait forever on a stopped engine."""
        with self._submit_lock:
            self._stopped = True
            self._live.clear()
        error = RequestError(ErrorKind.UNAVAILABLE, message)
        pending = list(self._subs.values())
        self._subs.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Submission):
                pending.append(item)
            elif isinstance(item, _Call):
                item.error = EngineUnavailable(message)
                item.done.set()
        for sub in pending:
            rid = sub.treq.rid
            _send(sub.sink, EngineOutput(rid, "", (), finish_reason=FinishReason("abort", message=message),
                                         error=error))


def _send(sink: Sink, out: EngineOutput) -> None:
    """A sink that raises (its event loop closed, say) loses its own output, not the engine thread."""
    try:
        sink(out)
    except Exception:
        logger.exception("the sink of request %s failed", out.rid)

