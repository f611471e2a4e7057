"""Executing a program: each state runs its expressions in order on its own worker thread while the
caller goes on; reading a variable waits until the expression that sets it has run.

`StreamExecutor` is the worker and what it has built (text, chat messages, variables and their
`meta_info`); `ProgramState` is the `s` a program sees; `ProgramStateGroup` is what `s.fork(n)`
returns. The names and behaviour are SGLang's frontend's, so a program written for it runs here.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from radixfair.lang.ir import (
    CommitLazy,
    ConcatenateAndAppend,
    ConstantText,
    Expr,
    ExprList,
    Gen,
    GenParams,
    Image,
    RoleBegin,
    RoleEnd,
    Select,
    VarScopeBegin,
    VarScopeEnd,
    Video,
    as_expr,
    named_exprs,
)
from radixfair.lang.speculative import DeferredGen, MessageMismatch, Speculation, fill_message
from radixfair.lang.usage import ApiUsage, UsageCounts

if TYPE_CHECKING:
    from radixfair.lang.backend.base import Backend, Continuation
    from radixfair.lang.chat_template import ChatTemplate

_END = object()  # the worker's last item: the program appends nothing more


class StreamExecutor:
    """One program state's worker and everything it has produced."""

    def __init__(self, backend: Backend, arguments: dict[str, Any], default_params: GenParams,
                 chat_template: ChatTemplate | None = None, stream: bool = False, use_thread: bool = True,
                 num_api_spec_tokens: int | None = None) -> None:
        self.sid = uuid.uuid4().hex
        self.backend = backend
        self.arguments = arguments
        self.default_params = default_params
        self.stream = stream
        self.chat_template = chat_template or backend.get_chat_template()
        self.num_api_spec_tokens = num_api_spec_tokens
        self.speculation = Speculation(num_api_spec_tokens) if num_api_spec_tokens is not None else None
        self.api_usage = ApiUsage(parent=backend.api_usage)
        # a chat model's assistant message under speculation: its gens, run as one call at its end
        self._deferred: list[DeferredGen] = []
        # the same seen from the program's thread: the gens of the message it has not closed yet,
        # whose values cannot be read before it does
        self._open_message: set[str] | None = None

        self.text_ = ""
        self.messages_: list[dict[str, Any]] = []
        self.variables: dict[str, Any] = {}
        self.variable_event: dict[str, threading.Event] = {}
        self.meta_info: dict[str, Any] = {}
        self.error_: BaseException | None = None
        self.is_finished = False

        self.cur_role: str | None = None
        self.cur_role_begin_pos = 0
        self.cur_role_suffix = ""
        self.fork_start_text_pos = 0
        self._scope_starts: dict[str, int] = {}

        # notified whenever the text grows, a variable is set, or the worker ends (for text_iter)
        self._changed = threading.Condition()
        self._ended = False
        self.use_thread = use_thread
        self._queue: queue.Queue[Any] = queue.Queue()
        self._worker: threading.Thread | None = None
        if use_thread:
            # not a daemon: a program's pending work finishes even if the caller's script has ended
            self._worker = threading.Thread(target=self._work, name=f"radixfair-lang-{self.sid[:8]}")
            self._worker.start()
        backend.begin_program(self)

    # ---- what the caller's thread does -------------------------------------------------------
    def submit(self, expr: Expr) -> None:
        if self.speculation is not None and self.backend.is_chat_model:
            self._track_message(expr)
        for name in named_exprs(expr):
            event = threading.Event()
            if self.error_ is not None:
                event.set()  # nothing will run any more: a read must not wait
            self.variable_event[name] = event
        if not self.use_thread:
            self._run_one(expr)
        elif self._ended:
            raise RuntimeError("this program state has ended (its program returned or its fork was joined)")
        else:
            self._queue.put(expr)

    def sync(self) -> None:
        if self.use_thread:
            self._queue.join()

    def end(self) -> None:
        """No more expressions will come: the worker finishes what it has and exits."""
        if self._ended:
            return
        self._ended = True
        if self._worker is not None:
            self._queue.put(_END)
        else:
            self._finish()
        self.backend.end_program(self)

    def _track_message(self, expr: Expr) -> None:
        if isinstance(expr, ExprList):
            for e in expr.exprs:
                self._track_message(e)
        elif isinstance(expr, RoleBegin) and expr.role == "assistant":
            self._open_message = set()
        elif isinstance(expr, RoleEnd) and expr.role == "assistant":
            self._open_message = None
        elif isinstance(expr, Gen) and expr.name is not None and self._open_message is not None:
            self._open_message.add(expr.name)

    def _check_readable(self, name: str) -> None:
        if self._open_message is not None and name in self._open_message:
            raise RuntimeError(f"{name!r} is read inside the assistant message that generates it: with API "
                               "speculative execution on a chat model the message is one call at its end; "
                               "read it after the message")

    def get_var(self, name: str) -> Any:
        self._check_readable(name)
        event = self.variable_event.get(name)
        if event is not None:
            event.wait()
        if name in self.variables:
            return self.variables[name]
        if self.error_ is not None:
            raise self.error_
        raise KeyError(f"no variable {name!r} in this program state")

    def set_var(self, name: str, value: Any) -> None:
        self.variables[name] = value

    def get_meta_info(self, name: str, timeout: float | None = None) -> Any:
        self._check_readable(name)
        event = self.variable_event.get(name)
        if event is not None and not event.wait(timeout):
            raise TimeoutError(f"timed out waiting for {name!r}")
        return self.meta_info.get(name)

    def text(self) -> str:
        self.sync()
        return self.text_

    def messages(self) -> list[dict[str, Any]]:
        self.sync()
        return self.messages_

    def error(self) -> BaseException | None:
        self.sync()
        return self.error_

    def fork(self, size: int = 1) -> list[StreamExecutor]:
        size = int(size)
        if size < 1:
            raise ValueError(f"fork: size must be >= 1 (got {size})")
        self.sync()
        if size > 1 and self.text_ and self.error_ is None:
            # prefill the shared prefix once, so that every branch finds it in the radix cache
            # instead of the branches computing it side by side
            self.submit(CommitLazy())
            self.sync()
        children = []
        for _ in range(size):
            child = StreamExecutor(self.backend, self.arguments, self.default_params, self.chat_template,
                                   self.stream, self.use_thread, self.num_api_spec_tokens)
            child.text_ = self.text_
            child.messages_ = list(self.messages_)
            child.variables = dict(self.variables)
            child.meta_info = dict(self.meta_info)
            child.cur_role, child.cur_role_begin_pos = self.cur_role, self.cur_role_begin_pos
            child.cur_role_suffix = self.cur_role_suffix
            child._scope_starts = dict(self._scope_starts)
            child.fork_start_text_pos = len(self.text_)
            child.error_ = self.error_
            children.append(child)
        return children

    def wait_changed(self, ready: Callable[[], bool]) -> None:
        """Block until `ready()` holds; it is re-checked whenever the state changes."""
        with self._changed:
            while not ready():
                self._changed.wait()

    # ---- the worker ---------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _END:
                    self._finish()
                    return
                self._run_one(item)
            finally:
                self._queue.task_done()

    def _run_one(self, expr: Expr) -> None:
        if self.error_ is not None:
            return  # a failed program runs nothing more; its reads raise the error
        try:
            self._execute(expr)
        except Exception as e:
            self._fail(e)
        self._notify()

    def _fail(self, error: BaseException) -> None:
        self.error_ = error
        for event in list(self.variable_event.values()):
            event.set()
        self._notify()

    def _finish(self) -> None:
        if self._deferred and self.error_ is None:
            try:
                self._run_deferred()  # a message the program left open
            except Exception as e:
                self._fail(e)
        self.is_finished = True
        self._notify()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _execute(self, expr: Expr) -> None:
        if isinstance(expr, ConstantText):
            self._fill(expr.value)
        elif isinstance(expr, ExprList):
            for e in expr.exprs:
                self._execute(e)
        elif isinstance(expr, Gen):
            self._execute_gen(expr)
        elif isinstance(expr, Select):
            self._execute_select(expr)
        elif isinstance(expr, RoleBegin):
            self._role_begin(expr.role)
        elif isinstance(expr, RoleEnd):
            self._role_end(expr.role)
        elif isinstance(expr, VarScopeBegin):
            self._scope_starts[expr.name] = len(self.text_)
        elif isinstance(expr, VarScopeEnd):
            self._set(expr.name, self.text_[self._scope_starts.pop(expr.name, len(self.text_)):], None)
        elif isinstance(expr, (Image, Video)):
            what = "image" if isinstance(expr, Image) else "video"
            raise ValueError(f"{what}(): the served model ({self.backend.get_model_name()}) takes text only")
        elif isinstance(expr, CommitLazy):
            self.backend.commit_lazy_operations(self)
        elif isinstance(expr, ConcatenateAndAppend):
            self._concatenate_and_append(expr)
        else:
            raise TypeError(f"cannot execute {expr!r}")

    def _fill(self, text: str) -> None:
        self.text_ += text
        if self.speculation is not None:
            self.speculation.follow(self, text)

    # ---- calls to the backend, counted ----------------------------------------------------------
    def _count(self, meta: dict[str, Any] | None, **extra: int) -> None:
        meta = meta or {}
        self.api_usage.add(calls=1, input_tokens=int(meta.get("prompt_tokens") or 0),
                           output_tokens=int(meta.get("completion_tokens") or 0), **extra)

    def call_generate(self, params: GenParams) -> tuple[str, dict[str, Any]]:
        text, meta = self.backend.generate(self, params)
        self._count(meta)
        return text, meta

    def call_speculate(self, params: GenParams) -> Continuation:
        cont = self.backend.speculate(self, params)
        self._count(cont.meta_info, spec_calls=1)
        return cont

    def usage(self) -> UsageCounts:
        return self.api_usage.snapshot()

    def _set(self, name: str | None, value: Any, meta: Any) -> None:
        if name is None:
            return
        self.variables[name] = value
        self.meta_info[name] = meta
        event = self.variable_event.get(name)
        if event is not None:
            event.set()

    def resolve_params(self, overrides: dict[str, Any]) -> GenParams:
        params = self.default_params.merged(overrides)
        if self.chat_template.stop_str:
            params = replace(params, stop=(*params.stop, *self.chat_template.stop_str))
        if params.n != 1:
            raise ValueError(f"gen: n={params.n} is not supported here; fork the state to sample several")
        return params

    def _execute_gen(self, expr: Gen) -> None:
        params = self.resolve_params(expr.overrides)
        name = expr.name
        if self.speculation is not None and self.backend.is_chat_model and self.cur_role == "assistant" \
                and not self.stream:
            self._deferred.append(DeferredGen(len(self.text_) - self.cur_role_begin_pos, name, params))
            return
        if not self.stream:
            if self.speculation is not None and not self.backend.is_chat_model:
                text, meta = self.speculation.gen(self, params)
            else:
                text, meta = self.call_generate(params)
                if self.speculation is not None:
                    self.speculation.drop(self, missed=False)
            self.text_ += text
            self._set(name, text, meta)
            return
        if self.speculation is not None:
            self.speculation.drop(self, missed=False)
        value, last_meta = "", None
        if name is not None:
            self.variables[name] = ""
        for piece, meta in self.backend.generate_stream(self, params):
            value += piece
            self.text_ += piece
            last_meta = meta
            if name is not None:
                self.variables[name] = value
                self.meta_info[name] = meta
            self._notify()
        self._count(last_meta)
        self._set(name, value, last_meta)

    def _run_deferred(self) -> None:
        """One call for the assistant message; each waiting gen's value is cut out of the answer."""
        gens, self._deferred = self._deferred, []
        assert self.speculation is not None
        begin = self.cur_role_begin_pos
        content = self.text_[begin:]
        first = gens[0].params
        params = replace(first, max_new_tokens=max(self.speculation.num_tokens, first.max_new_tokens), stop=())
        self.text_ = self.text_[:begin]  # the call sends the messages before this one
        try:
            answer, meta = self.call_generate(params)
        finally:
            self.text_ = self.text_[:begin] + content
        self.api_usage.add(spec_calls=1)
        try:
            values = fill_message(answer, content, gens)
        except MessageMismatch as e:
            self.api_usage.add(spec_misses=1)
            raise ValueError(f"num_api_spec_tokens: the chat model's message does not follow the program's "
                             f"text ({e}); the whole message was {answer!r}") from e
        self.api_usage.add(spec_hits=len(gens) - 1)
        parts, done = [], 0
        for g, value in zip(gens, values, strict=True):
            parts += [content[done:g.offset], value]
            done = g.offset
        self.text_ = self.text_[:begin] + "".join(parts) + content[done:]
        for g, value in zip(gens, values, strict=True):
            self._set(g.name, value, {**meta, "speculative": True})

    def _execute_select(self, expr: Select) -> None:
        if self._deferred:
            raise ValueError("select: not inside an assistant message whose gens wait for API speculative "
                             "execution (num_api_spec_tokens) on a chat model")
        decision = self.backend.select(self, expr.choices, expr.temperature, expr.choices_method)
        self._count(decision.meta_info)
        self._fill(decision.decision)
        self._set(expr.name, decision.decision, decision.meta_info)

    def _role_begin(self, role: str) -> None:
        if self.cur_role is not None:
            raise ValueError(f"{role}: roles cannot nest (the {self.cur_role} role is still open)")
        prefix, suffix = self.chat_template.get_prefix_and_suffix(role, self.messages_)
        self._fill(prefix)
        self.cur_role, self.cur_role_begin_pos, self.cur_role_suffix = role, len(self.text_), suffix

    def _role_end(self, role: str) -> None:
        if self.cur_role != role:
            raise ValueError(f"{role}_end() without {role}_begin()"
                             + (f" (the {self.cur_role} role is open)" if self.cur_role else ""))
        if role == "assistant" and self.backend.is_chat_model:
            if self._deferred:
                self._run_deferred()
            self.backend.role_end_generate(self)
        content = self.text_[self.cur_role_begin_pos:]
        self._fill(self.cur_role_suffix)
        self.messages_.append({"role": role, "content": content})
        self.cur_role, self.cur_role_suffix = None, ""

    def _concatenate_and_append(self, expr: ConcatenateAndAppend) -> None:
        branches = [s.stream_executor for s in expr.states]
        for b in branches:
            b.sync()
            if b.error_ is not None:
                raise b.error_
        if self.backend.support_concate_and_append:
            for b in branches:
                b.submit(CommitLazy())
                b.sync()
            self._fill("".join(b.text_[b.fork_start_text_pos:] for b in branches))
            self.backend.concatenate_and_append([b.sid for b in branches], self.sid)
        else:
            self._fill("".join(b.text_[b.fork_start_text_pos:] for b in branches))


class ProgramState:
    """The `s` of a program: append with `s += ...`, read variables with `s["name"]`."""

    def __init__(self, stream_executor: StreamExecutor) -> None:
        self.stream_executor = stream_executor
        self.ret_value: Any = None

    # ---- appending -----------------------------------------------------------------------------
    def __iadd__(self, other: object) -> ProgramState:
        if other is None:
            raise ValueError("cannot append None to a program state")
        self.stream_executor.submit(as_expr(other))
        return self

    def _role(self, role: str, expr: object = None) -> Any:
        if expr is not None:
            e = ExprList([RoleBegin(role), as_expr(expr), RoleEnd(role)])
            self.stream_executor.submit(e)
            return e

        @contextmanager
        def scope() -> Iterator[None]:
            self.stream_executor.submit(RoleBegin(role))
            yield
            self.stream_executor.submit(RoleEnd(role))

        return scope()

    def system(self, expr: object = None) -> Any:
        """`s.system("...")` appends a system message; `with s.system():` wraps what the block appends."""
        return self._role("system", expr)

    def user(self, expr: object = None) -> Any:
        return self._role("user", expr)

    def assistant(self, expr: object = None) -> Any:
        return self._role("assistant", expr)

    @contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        """What the block appends becomes the variable `name`."""
        self.stream_executor.submit(VarScopeBegin(name))
        yield
        self.stream_executor.submit(VarScopeEnd(name))

    # ---- branching -----------------------------------------------------------------------------
    def fork(self, size: int = 1, position_ids_offset: Sequence[int] | None = None) -> ProgramStateGroup:
        """`size` copies of this state that go on in parallel; the shared text is prefilled once."""
        return ProgramStateGroup([ProgramState(x) for x in self.stream_executor.fork(size)], self)

    @contextmanager
    def copy(self, position_ids_offset: Sequence[int] | None = None) -> Iterator[ProgramState]:
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    # ---- reading -------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self.stream_executor.variables

    def get_var(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def get_meta_info(self, name: str) -> Any:
        return self.stream_executor.get_meta_info(name)

    def text(self) -> str:
        return self.stream_executor.text()

    def messages(self) -> list[dict[str, Any]]:
        return self.stream_executor.messages()

    def sync(self) -> None:
        self.stream_executor.sync()

    def error(self) -> BaseException | None:
        return self.stream_executor.error()

    def api_usage(self) -> UsageCounts:
        """This state's calls and tokens so far (not its forks'), and what API speculative
        execution saved."""
        self.stream_executor.sync()
        return self.stream_executor.usage()

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """The text (or one variable) as it grows: chunks that concatenate to the final value.
        Without `stream=True` it yields the final value once."""
        ex = self.stream_executor
        if not ex.stream:
            yield self.text() if var_name is None else self.get_var(var_name)
            return
        pos = 0
        while True:
            snapshot: dict[str, Any] = {}

            def ready(pos: int = pos, snapshot: dict[str, Any] = snapshot) -> bool:
                if var_name is None:
                    done = ex.is_finished
                    cur = ex.text_
                else:
                    event = ex.variable_event.get(var_name)
                    done = ex.is_finished or (event is not None and event.is_set())
                    cur = ex.variables.get(var_name, "")
                snapshot["done"], snapshot["cur"] = done, cur if isinstance(cur, str) else str(cur)
                return done or len(snapshot["cur"]) > pos

            ex.wait_changed(ready)
            cur = snapshot["cur"]
            if len(cur) > pos:
                yield cur[pos:]
                pos = len(cur)
            if snapshot["done"]:
                return

    async def text_async_iter(self, var_name: str | None = None,
                              return_meta_data: bool = False) -> AsyncIterator[Any]:
        """`text_iter` for asyncio: the waiting happens in a worker thread."""
        loop = asyncio.get_running_loop()
        it = self.text_iter(var_name)
        done = object()
        while True:
            piece = await loop.run_in_executor(None, next, it, done)
            if piece is done:
                return
            if return_meta_data and var_name is not None:
                yield piece, self.stream_executor.meta_info.get(var_name)
            else:
                yield piece

    def __del__(self) -> None:
        executor = getattr(self, "stream_executor", None)
        if executor is not None:
            executor.end()

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"


class ProgramStateGroup:
    """The branches of a fork: `forks += expr` appends to each (a function of the index, a list
    with one item per branch, or one expression for all); `join()` brings their results back."""

    def __init__(self, states: list[ProgramState], src_state: ProgramState) -> None:
        self.states = states
        self.src_state = src_state

    def join(self, mode: str = "gather_variable") -> None:
        """`gather_variable`: each variable a branch created becomes, in the source state, the list
        of its values in branch order. `concate_and_append`: the branches' new text is appended to
        the source state, in branch order."""
        src = self.src_state.stream_executor
        if mode == "gather_variable":
            known = set(src.variables)
            gathered: dict[str, list[Any]] = {}
            for state in self.states:
                ex = state.stream_executor
                ex.sync()
                if ex.error_ is not None and src.error_ is None:
                    src.sync()
                    src._fail(ex.error_)
                for k, v in ex.variables.items():
                    if k not in known:
                        gathered.setdefault(k, []).append(v)
            src.variables.update(gathered)
        elif mode == "concate_and_append":
            self.src_state += ConcatenateAndAppend(self.states)
            src.sync()
        else:
            raise ValueError(f"join: mode must be 'gather_variable' or 'concate_and_append' (got {mode!r})")
        for state in self.states:
            state.stream_executor.end()

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: object) -> ProgramStateGroup:
        if isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"{len(other)} expressions for {len(self.states)} branches")
            for state, expr in zip(self.states, other, strict=True):
                state += expr
        elif callable(other):
            for i, state in enumerate(self.states):
                state += other(i)
        else:
            expr = as_expr(other)
            for state in self.states:
                state += expr
        return self
