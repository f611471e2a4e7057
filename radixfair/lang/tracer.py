"""A program's constant prefix: the text it appends before anything that depends on its arguments
or on the model. `function.cache()` and `run_batch` prefill it once, so every run finds it cached.

The program runs against a tracing state with placeholder arguments; the first use of an argument
(formatting it, adding it to text, testing it), the first `gen`/`select`, or a read of the state
ends the trace. Bound arguments (`function.bind`) are constants and keep their values.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

from radixfair.lang.ir import ConstantText, Expr, ExprList, RoleBegin, RoleEnd, as_expr

if TYPE_CHECKING:
    from radixfair.lang.chat_template import ChatTemplate
    from radixfair.lang.program import SglFunction


class _StopTracing(Exception):
    pass


def _stop(*_: Any, **__: Any) -> NoReturn:
    raise _StopTracing


class _Placeholder:
    """An argument whose value is unknown while tracing: any use of it ends the prefix."""

    __add__ = __radd__ = __format__ = __str__ = __bool__ = __len__ = __iter__ = __getitem__ = _stop
    __int__ = __float__ = __eq__ = __lt__ = __contains__ = __getattr__ = __call__ = __mul__ = _stop
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
        else:
            raise _StopTracing

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

    __getattr__ = _stop  # fork, var_scope, reads...: the prefix ends here
    __getitem__ = _stop


def extract_prefix(program: SglFunction, chat_template: ChatTemplate) -> str:
    """The text `program` appends before its first step that is not constant ("" if none)."""
    state = _TracingState(chat_template)
    kwargs: dict[str, Any] = {name: _Placeholder() for name in program.arg_names}
    kwargs.update(program.bind_arguments)
    try:
        program.func(state, **kwargs)
    except _StopTracing:
        pass
    except Exception:
        return ""  # the program cannot run on placeholders: no prefix to share
    return state.text
