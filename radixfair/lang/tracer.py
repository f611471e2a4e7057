"""Tracing: a program's constant prefix, the text it appends before anything that depends on its
arguments or on the model. `function.trace()` returns it; `function.cache()` and `run_batch` (on
a backend with a prefix cache) prefill it once, so every run of the batch starts on a warm cache.

The program runs against a tracing state with placeholder arguments; the first use of an argument
(appending it, formatting it, adding it to text, testing it), the first `gen`/`select`, or any
other use of the state (a read, a fork) ends the trace. Bound arguments (`function.bind`) are
constants and keep their values. Roles render with the backend's chat template, as they will run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from radixfair.lang.ir import ConstantText, Expr, ExprList, Gen, RoleBegin, RoleEnd, Select, as_expr

if TYPE_CHECKING:
    from radixfair.lang.chat_template import ChatTemplate
    from radixfair.lang.program import SglFunction


class _StopTracing(Exception):
    """The trace reached a step that is not constant; the message says which."""


class _Placeholder(Expr):
    """An argument whose value is unknown while tracing: any use of it ends the prefix (appending
    it, adding it to text, formatting it, testing it, iterating over it, ...)."""

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def _use(self, *_: Any, **__: Any) -> NoReturn:
        raise _StopTracing(f"argument {object.__getattribute__(self, '_name')!r}")

    __add__ = __radd__ = __format__ = __str__ = __bool__ = __len__ = __iter__ = __getitem__ = _use
    __int__ = __float__ = __eq__ = __lt__ = __contains__ = __getattr__ = __call__ = __mul__ = _use
    __hash__ = None  # type: ignore[assignment]


class _TracingState:
    def __init__(self, chat_template: ChatTemplate) -> None:
        self.chat_template = chat_template
        self.text = ""
        self.messages: list[dict[str, Any]] = []
        self.role: tuple[str, int, str] | None = None  # (role, content start, suffix)

    def __iadd__(self, other: object) -> _TracingState:
        self._append(as_expr(other))
        return self

    def _append(self, expr: Expr) -> None:
        if isinstance(expr, ConstantText):
            self.text += expr.value
        elif isinstance(expr, ExprList):
            for e in expr.exprs:
                self._append(e)
        elif isinstance(expr, RoleBegin) and self.role is None:
            prefix, suffix = self.chat_template.get_prefix_and_suffix(expr.role, self.messages)
            self.text += prefix
            self.role = (expr.role, len(self.text), suffix)
        elif isinstance(expr, RoleEnd) and self.role is not None and self.role[0] == expr.role:
            role, start, suffix = self.role
            self.messages.append({"role": role, "content": self.text[start:]})
            self.text += suffix
            self.role = None
        elif isinstance(expr, _Placeholder):
            expr._use()
        elif isinstance(expr, (Gen, Select)):
            raise _StopTracing(f"{'gen' if isinstance(expr, Gen) else 'select'} {expr.name!r}")
        elif isinstance(expr, (RoleBegin, RoleEnd)):
            raise _StopTracing(f"a misplaced {type(expr).__name__}({expr.role!r})")
        else:
            raise _StopTracing(type(expr).__name__)

    def _role(self, role: str, expr: object = None) -> Any:
        if expr is not None:
            self += ExprList([RoleBegin(role), as_expr(expr), RoleEnd(role)])
            return None

        @contextmanager
        def scope() -> Iterator[None]:
            self._append(RoleBegin(role))
            yield
            self._append(RoleEnd(role))

        return scope()

    def system(self, expr: object = None) -> Any:
        return self._role("system", expr)

    def user(self, expr: object = None) -> Any:
        return self._role("user", expr)

    def assistant(self, expr: object = None) -> Any:
        return self._role("assistant", expr)

    def __getattr__(self, name: str) -> NoReturn:  # fork, var_scope, text(), ...: the prefix ends here
        raise _StopTracing(f"s.{name}")

    def __getitem__(self, name: str) -> NoReturn:
        raise _StopTracing(f"a read of s[{name!r}]")


class ProgramTrace(NamedTuple):
    """What tracing found: the constant prefix, and the step that ended it."""

    prefix: str
    # "argument 'question'", "gen 'answer'", "select 'tool'", "s.fork", "end of program", or
    # "error: ..." when the program cannot run on placeholder arguments (then the prefix is "")
    stopped_at: str
    # the messages complete within the prefix
    messages: list[dict[str, Any]]


def trace_program(program: SglFunction, chat_template: ChatTemplate,
                  arguments: dict[str, Any] | None = None) -> ProgramTrace:
    """Run `program` on placeholder arguments (except its bound ones and `arguments`, which are
    constants) up to its first step that is not constant."""
    state = _TracingState(chat_template)
    kwargs: dict[str, Any] = {name: _Placeholder(name) for name in program.arg_names}
    kwargs.update(program.bind_arguments)
    kwargs.update(arguments or {})
    try:
        program.func(state, **kwargs)
    except _StopTracing as stop:
        return ProgramTrace(state.text, str(stop), state.messages)
    except Exception as e:
        return ProgramTrace("", f"error: {type(e).__name__}: {e}", [])
    return ProgramTrace(state.text, "end of program", state.messages)


def extract_prefix(program: SglFunction, chat_template: ChatTemplate) -> str:
    """The text `program` appends before its first step that is not constant ("" if none)."""
    return trace_program(program, chat_template).prefix
