"""What a role (`s.user(...)`, `assistant_begin()`, ...) adds around its content.

A served model's own chat template is a Jinja program over a whole conversation; a program builds
its text one message at a time. `JinjaChatTemplate` finds a message's prefix and suffix by rendering
the conversation so far with and without one more message whose content is a marker, so every
template renders as the model expects (a default system prompt, a BOS token before the first
message, ...) and `messages()` renders back through the template to the same text. Named fixed
templates (SGLang's `default`, `chatml`) serve models without one, or a backend told to use one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_MARKER = "RADIXFAIRMESSAGECONTENT"


class ChatTemplate(ABC):
    name: str
    image_token: str = "<image>"
    stop_str: tuple[str, ...] = ()

    @abstractmethod
    def get_prefix_and_suffix(self, role: str, hist_messages: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
        """The text before and after the content of a `role` message that follows `hist_messages`."""


@dataclass
class FixedChatTemplate(ChatTemplate):
    name: str
    roles: dict[str, tuple[str, str]]
    stop_str: tuple[str, ...] = ()

    def get_prefix_and_suffix(self, role: str, hist_messages: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
        return self.roles.get(role, ("", ""))


_FIXED = {
    t.name: t
    for t in (
        FixedChatTemplate("default", {"system": ("SYSTEM:", "\n"), "user": ("USER:", "\n"),
                                      "assistant": ("ASSISTANT:", "\n")}),
        FixedChatTemplate("chatml", {role: (f"<|im_start|>{role}\n", "<|im_end|>\n")
                                     for role in ("system", "user", "assistant")}, stop_str=("<|im_end|>",)),
    )
}


def get_chat_template(name: str) -> ChatTemplate:
    """A named fixed template: `default` (SGLang's `SYSTEM:`/`USER:`/`ASSISTANT:`) or `chatml`."""
    if name not in _FIXED:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(sorted(_FIXED))} "
                         "(or leave it out to use the served model's own)")
    return _FIXED[name]


@dataclass
class JinjaChatTemplate(ChatTemplate):
    """A model's own template (`source`, rendered as transformers renders it, with `variables` such
    as `bos_token`). A role the template cannot render after the conversation so far (some reject
    a system message, or roles out of turn) falls back to `fallback`."""

    source: str
    variables: dict[str, Any] = field(default_factory=dict)
    name: str = "model"
    fallback: ChatTemplate = field(default_factory=lambda: _FIXED["default"])

    def get_prefix_and_suffix(self, role: str, hist_messages: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
        hist = [{"role": m["role"], "content": m["content"]} for m in hist_messages]
        try:
            before = self._render(hist) if hist else ""
            after = self._render([*hist, {"role": role, "content": _MARKER}])
        except Exception:
            return self.fallback.get_prefix_and_suffix(role, hist_messages)
        if not after.startswith(before) or after.count(_MARKER) != 1:
            return self.fallback.get_prefix_and_suffix(role, hist_messages)
        prefix, _, suffix = after[len(before):].partition(_MARKER)
        return prefix, suffix

    def _render(self, messages: list[dict[str, Any]]) -> str:
        from radixfair.tokenizer.chat_template import render_chat_template

        return render_chat_template(self.source, messages, add_generation_prompt=False, tools=None,
                                    variables=self.variables)


def model_chat_template(source: str | None, variables: Mapping[str, Any] | None = None) -> ChatTemplate:
    """The served model's template, or SGLang's `default` for a model without one."""
    if not source:
        return _FIXED["default"]
    return JinjaChatTemplate(source, dict(variables or {}))
