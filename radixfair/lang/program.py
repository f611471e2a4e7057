"""`@function` programs: running one (`run`), many (`run_batch`), and prefilling their constant prefix
(`cache`)."""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from radixfair.lang.config import global_config
from radixfair.lang.interpreter import ProgramState, StreamExecutor
from radixfair.lang.ir import GenParams
from radixfair.lang.tracer import ProgramTrace, trace_program

if TYPE_CHECKING:
    from radixfair.lang.backend.base import Backend


def resolve_backend(backend: Any) -> Backend:
    """`backend`, or the default one; a `Runtime` stands for its `endpoint`, as in SGLang."""
    backend = backend if backend is not None else global_config.default_backend
    if backend is None:
        raise RuntimeError("no backend: call radixfair.set_default_backend(radixfair.RuntimeEndpoint(URL)) "
                           "or pass backend=... to run")
    endpoint = getattr(backend, "endpoint", None)
    resolved: Backend = endpoint if endpoint is not None else backend
    return resolved


def _gen_params(max_new_tokens: int, n: int, stop: str | Sequence[str] | None, stop_token_ids: Sequence[int] | None,
                temperature: float, top_p: float, top_k: int, min_p: float, frequency_penalty: float,
                presence_penalty: float, ignore_eos: bool, return_logprob: bool | None,
                logprob_start_len: int | None, top_logprobs_num: int | None,
                return_text_in_logprobs: bool | None) -> GenParams:
    return GenParams(
        max_new_tokens=max_new_tokens, n=n, stop=tuple([stop] if isinstance(stop, str) else stop or ()),
        stop_token_ids=tuple(stop_token_ids or ()), temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, ignore_eos=ignore_eos,
        return_logprob=return_logprob, logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs)


class SglFunction:
    """A program: a Python function whose first argument is the state `s`."""

    def __init__(self, func: Callable[..., Any], num_api_spec_tokens: int | None = None,
                 bind_arguments: dict[str, Any] | None = None) -> None:
        if num_api_spec_tokens is not None and (isinstance(num_api_spec_tokens, bool)
                                                or not isinstance(num_api_spec_tokens, int)
                                                or num_api_spec_tokens < 1):
            raise ValueError(f"num_api_spec_tokens: must be an integer >= 1 (got {num_api_spec_tokens!r})")
        self.func = func
        self.num_api_spec_tokens = num_api_spec_tokens
        self.bind_arguments = dict(bind_arguments or {})
        spec = inspect.getfullargspec(func)
        if not spec.args or spec.args[0] != "s":
            raise TypeError(f"{getattr(func, '__name__', func)}: a program's first argument must be named 's'")
        self.arg_names = spec.args[1:]
        self.arg_defaults = tuple(spec.defaults or ())

    def bind(self, **kwargs: Any) -> SglFunction:
        """The same program with some arguments fixed."""
        unknown = sorted(set(kwargs) - set(self.arg_names))
        if unknown:
            raise TypeError(f"bind: the program has no argument(s) {', '.join(unknown)}")
        return SglFunction(self.func, self.num_api_spec_tokens, {**self.bind_arguments, **kwargs})

    def run(self, *args: Any, max_new_tokens: int = 128, n: int = 1, stop: str | Sequence[str] | None = None,
            stop_token_ids: Sequence[int] | None = None, temperature: float = 1.0, top_p: float = 1.0,
            top_k: int = -1, min_p: float = 0.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
            ignore_eos: bool = False, return_logprob: bool | None = None, logprob_start_len: int | None = None,
            top_logprobs_num: int | None = None, return_text_in_logprobs: bool | None = None,
            stream: bool = False, backend: Any = None, use_thread: bool = True, **kwargs: Any) -> ProgramState:
        """Run the program once; the sampling arguments are the defaults of its `gen` calls. Returns
        its state at once (the program's steps go on in the background; reading a variable waits);
        with `stream=True` the program body itself runs in a thread too, for `text_iter`."""
        params = _gen_params(max_new_tokens, n, stop, stop_token_ids, temperature, top_p, top_k, min_p,
                             frequency_penalty, presence_penalty, ignore_eos, return_logprob, logprob_start_len,
                             top_logprobs_num, return_text_in_logprobs)
        return run_program(self, resolve_backend(backend), args, kwargs, params, stream, use_thread=use_thread)

    def run_batch(self, batch_kwargs: Sequence[dict[str, Any]] | Sequence[Sequence[Any]], *,
                  max_new_tokens: int = 128, n: int = 1, stop: str | Sequence[str] | None = None,
                  stop_token_ids: Sequence[int] | None = None, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = -1, min_p: float = 0.0, frequency_penalty: float = 0.0,
                  presence_penalty: float = 0.0, ignore_eos: bool = False, return_logprob: bool | None = None,
                  logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
                  return_text_in_logprobs: bool | None = None, backend: Any = None,
                  num_threads: str | int = "auto", progress_bar: bool = False,
                  generator_style: bool = False) -> Any:
        """Run the program once per argument set, in parallel on `num_threads` threads ("auto": up to
        one per program); returns the finished states in order (an iterator of them with
        `generator_style`). `progress_bar` shows a tqdm bar."""
        if not isinstance(batch_kwargs, (list, tuple)):
            raise TypeError("run_batch: batch_kwargs must be a list of dicts (or of argument lists)")
        if not batch_kwargs:
            return []
        arguments = [self._as_kwargs(a) for a in batch_kwargs]
        params = _gen_params(max_new_tokens, n, stop, stop_token_ids, temperature, top_p, top_k, min_p,
                             frequency_penalty, presence_penalty, ignore_eos, return_logprob, logprob_start_len,
                             top_logprobs_num, return_text_in_logprobs)
        return run_program_batch(self, resolve_backend(backend), arguments, params, num_threads, progress_bar,
                                 generator_style)

    def _as_kwargs(self, a: dict[str, Any] | Sequence[Any]) -> dict[str, Any]:
        if isinstance(a, dict):
            return a
        if not isinstance(a, (list, tuple)):
            raise TypeError(f"run_batch: each item must be a dict or a list of arguments, got {a!r}")
        required = len(self.arg_names) - len(self.arg_defaults)
        if not required <= len(a) <= len(self.arg_names):
            raise TypeError(f"run_batch: {len(a)} arguments for a program that takes "
                            f"{required}..{len(self.arg_names)}")
        return dict(zip(self.arg_names, a, strict=False))

    def trace(self, *, backend: Any = None, **kwargs: Any) -> ProgramTrace:
        """Run the program symbolically: its arguments are placeholders (except bound ones and
        `kwargs`, which are constants), and the first step that depends on one of them or on the
        model ends the trace. Returns the constant prefix (roles rendered with the backend's chat
        template; SGLang's `default` without a backend) and what ended it."""
        unknown = sorted(set(kwargs) - set(self.arg_names))
        if unknown:
            raise TypeError(f"trace: the program has no argument(s) {', '.join(unknown)}")
        if backend is None and global_config.default_backend is None:
            from radixfair.lang.chat_template import get_chat_template

            template = get_chat_template("default")
        else:
            template = resolve_backend(backend).get_chat_template()
        return trace_program(self, template, kwargs)

    def cache(self, backend: Any = None) -> str:
        """Prefill the program's constant prefix (the text before its first use of an argument or
        the model); returns that prefix."""
        return cache_program(self, resolve_backend(backend))

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        return self.run(*args, **kwargs)


def _run_body(state: ProgramState, program: SglFunction, args: Sequence[Any], kwargs: dict[str, Any],
              sync: bool) -> None:
    executor = state.stream_executor
    try:
        state.ret_value = program.func(state, *args, **kwargs)
    except BaseException as e:
        if executor.error_ is None:
            executor.error_ = e
        raise
    finally:
        executor.end()
    if sync:
        executor.sync()
    if global_config.verbosity >= 2:
        print(state.text())


def run_program(program: SglFunction, backend: Backend, args: Sequence[Any], kwargs: dict[str, Any],
                default_params: GenParams, stream: bool, sync: bool = False, use_thread: bool = True) -> ProgramState:
    kwargs = {**kwargs, **program.bind_arguments}
    executor = StreamExecutor(backend, kwargs, default_params, stream=stream, use_thread=use_thread,
                              num_api_spec_tokens=program.num_api_spec_tokens)
    state = ProgramState(executor)
    if stream:
        def body() -> None:
            # an exception is kept as the state's error(): the caller reads the stream, not this thread
            with contextlib.suppress(BaseException):
                _run_body(state, program, args, kwargs, sync)

        threading.Thread(target=body, name="radixfair-lang-program", daemon=True).start()
    else:
        _run_body(state, program, args, kwargs, sync)
    return state


def cache_program(program: SglFunction, backend: Backend) -> str:
    prefix = trace_program(program, backend.get_chat_template()).prefix
    if prefix:
        backend.cache_prefix(prefix)
    return prefix


def run_program_batch(program: SglFunction, backend: Backend, arguments: list[dict[str, Any]],
                      default_params: GenParams, num_threads: str | int, progress_bar: bool,
                      generator_style: bool = False) -> Any:
    if global_config.enable_precache_with_tracing and len(arguments) > 1:
        cache_program(program, backend)
    if num_threads == "auto":
        threads = max(96, (os.cpu_count() or 1) * 16)
    elif isinstance(num_threads, int) and num_threads >= 1:
        threads = num_threads
    else:
        raise ValueError(f"num_threads: must be 'auto' or an integer >= 1 (got {num_threads!r})")
    threads = min(threads, len(arguments))
    states = _run_states(program, backend, arguments, default_params, threads, progress_bar)
    return states if generator_style else list(states)


def _run_states(program: SglFunction, backend: Backend, arguments: list[dict[str, Any]],
                default_params: GenParams, threads: int, progress_bar: bool) -> Iterator[ProgramState]:
    from tqdm import tqdm

    bar = tqdm(total=len(arguments)) if progress_bar else None

    def one(kwargs: dict[str, Any]) -> ProgramState:
        return run_program(program, backend, (), kwargs, default_params, stream=False, sync=True)

    try:
        with ThreadPoolExecutor(threads) as pool:
            futures: list[Future[ProgramState]] = []
            for kwargs in arguments:
                f = pool.submit(one, kwargs)
                if bar is not None:
                    f.add_done_callback(lambda _: bar.update())
                futures.append(f)
            for f in futures:
                yield f.result()
    finally:
        if bar is not None:
            bar.close()
