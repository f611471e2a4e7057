"""Chat templates rendered exactly as `transformers` renders them.

Prompts (and therefore prefix-cache hits) must be byte-identical to what users of the HF stack get, so the
jinja environment, its globals and the normalization of the messages all follow transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment


def render_chat_template(
    source: str,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool,
    tools: Sequence[Mapping[str, Any]] | None,
    variables: Mapping[str, Any],
) -> str:
    """Render `messages` with the template `source`, byte-identical to transformers' output.

    `variables` become template variables (bos_token, enable_thinking, documents, ...).
    """
    if not messages:
        raise ValueError("Cannot apply a chat template to an empty conversation")
    template = _compile_chat_template(source)

    tool_schemas: list[Any] | None = None
    if tools is not None:
        tool_schemas = []
        for tool in tools:
            if not isinstance(tool, Mapping):
                raise TypeError(f"Tools must be JSON-schema dicts, got {tool!r}")
            tool_schemas.append(_plain_template_data(tool))

    plain_variables: dict[str, Any] = _plain_template_data(dict(variables))
    documents = plain_variables.pop("documents", None)
    return template.render(
        messages=[_normalize_message(m) for m in messages],
        tools=tool_schemas,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        **plain_variables,
    )


class _GenerationTagExtension(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` and render its body unchanged.

    transformers uses this tag to compute assistant-token masks for training. We never need the mask, but
    templates that contain the tag must still compile and render the same text.
    """

    tags = {"generation"}  # noqa: RUF012 - jinja reads this class attribute by name

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    # Templates call this to reject conversations they cannot format (e.g. roles that don't alternate).
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers replaces jinja's tojson: jinja's escapes <, >, &, ' as \u00XX (HTML-safe) and sorts keys,
    # which would put different bytes into the prompt than the model saw in training.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    # Used by e.g. Llama-3.1 templates to print today's date in the system prompt.
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without exposing the `dict` type itself (no attribute walking from it)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's `namespace()` but refusing underscore attributes, as transformers does for untrusted templates."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


def compile_chat_template(source: str) -> jinja2.Template:
    """`source` compiled as `render_chat_template` compiles it; raises jinja2.TemplateSyntaxError."""
    return _compile_chat_template(source)


@functools.lru_cache(maxsize=32)
def _compile_chat_template(source: str) -> jinja2.Template:
    # Chat templates come from model files, i.e. untrusted code: the immutable sandbox blocks attribute access to
    # Python internals and in-place mutation of the messages. trim_blocks/lstrip_blocks/loopcontrols and the
    # globals below are exactly transformers' environment, since templates are written (and tested) against it.
    # Compiling takes milliseconds, far more than rendering, so every Tokenizer sharing a template shares this.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTagExtension, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def _plain_template_data(value: Any) -> Any:
    """Rebuild `value` from plain JSON-like types, as transformers does before rendering.

    Objects with methods the sandbox doesn't know about (pydantic models, numpy scalars, ...) could otherwise be
    reached from the template; converting also makes `tojson` output identical to transformers'.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, numpy strings) would carry their extra methods along
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(k): _plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(v) for v in value)
    if type(value).__module__ == "numpy" and callable(getattr(value, "item", None)):
        # numpy scalars: np.bool_(False) would otherwise become a truthy placeholder string.
        return _plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize_message(message: Any) -> dict[str, Any]:
    if callable(getattr(message, "model_dump", None)):
        message = message.model_dump()
    elif dataclasses.is_dataclass(message) and not isinstance(message, type):
        message = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    if not isinstance(message, Mapping):
        raise TypeError(f"Chat messages must be dicts, got {message!r}")
    # OpenAI-style clients send `content=None` / `tool_calls=None`; many templates test `is defined` and would
    # print "None", so (like transformers) a None value counts as an absent key.
    plain: dict[str, Any] = _plain_template_data({k: v for k, v in message.items() if v is not None})
    # Different APIs name the reasoning text differently; templates read `reasoning_content` (or `thinking`).
    reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
    if reasoning is not None:
        plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
    return plain
