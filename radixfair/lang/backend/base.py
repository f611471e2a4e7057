"""The interface between the interpreter and a model.

The interpreter hands a backend the executor (`s`: its text, chat messages, current role) and the
resolved sampling settings, and gets text back. A backend that only has a chat API (an OpenAI
backend) can read `s.messages_` instead of `s.text_`, and defer work to `role_end_generate`; the
optional hooks below are where such a backend plugs in without the interpreter changing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from radixfair.lang.usage import ApiUsage

if TYPE_CHECKING:
    from radixfair.lang.chat_template import ChatTemplate
    from radixfair.lang.choices import ChoicesDecision, ChoicesSamplingMethod
    from radixfair.lang.interpreter import StreamExecutor
    from radixfair.lang.ir import GenParams


class Continuation(NamedTuple):
    """What a speculative generation produced (`Backend.speculate`)."""

    text: str
    # where each generated token ends in `text`; None where the server does not say
    token_ends: tuple[int, ...] | None
    # the model ended it (EOS), rather than the token limit: nothing follows `text`
    finished: bool
    meta_info: dict[str, Any]


class Backend(ABC):
    # can join forks by concatenating their KV in the server (`concatenate_and_append`)
    support_concate_and_append: bool = False
    # generations go through a chat API (the messages, not the text)
    is_chat_model: bool = False

    @abstractmethod
    def get_model_name(self) -> str: ...

    @abstractmethod
    def get_chat_template(self) -> ChatTemplate: ...

    @abstractmethod
    def generate(self, s: StreamExecutor, params: GenParams) -> tuple[str, dict[str, Any]]:
        """Continue `s`: the new text and SGLang's `meta_info` for it."""

    @abstractmethod
    def generate_stream(self, s: StreamExecutor, params: GenParams) -> Iterator[tuple[str, dict[str, Any]]]:
        """Continue `s`, yielding (new text, meta_info so far) as it comes."""

    @abstractmethod
    def select(self, s: StreamExecutor, choices: Sequence[str], temperature: float,
               choices_method: ChoicesSamplingMethod) -> ChoicesDecision:
        """Pick the choice that best continues `s`."""

    def speculate(self, s: StreamExecutor, params: GenParams) -> Continuation:
        """Continue `s` for API speculative execution (`params` has no stop strings and the
        speculation's token budget). Backends that can tell where each token ends say so."""
        text, meta = self.generate(s, params)
        finish = meta.get("finish_reason")
        finished = isinstance(finish, dict) and finish.get("type") == "stop"
        return Continuation(text, None, finished, meta)

    @property
    def api_usage(self) -> ApiUsage:
        """Calls and tokens of every program run on this backend (see `radixfair.lang.usage`)."""
        usage = self.__dict__.get("_api_usage")
        if usage is None:
            usage = self.__dict__.setdefault("_api_usage", ApiUsage())
        return usage

    # ---- optional: prefix caching, program lifetime, server control ----------------------------
    def cache_prefix(self, prefix: str) -> None:
        """Make the backend hold `prefix` (a program's constant prefix) ready for what follows."""
        return None

    def commit_lazy_operations(self, s: StreamExecutor) -> None:
        """Send what `s` holds so far (before a fork, so that the branches share it)."""
        return None

    def concatenate_and_append(self, src_rids: list[str], dst_rid: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot concatenate KV caches")

    def begin_program(self, s: StreamExecutor) -> None:
        """Called when a state (a program or a fork's branch) starts."""
        return None

    def end_program(self, s: StreamExecutor) -> None:
        """Called when a state will get no more expressions."""
        return None

    def role_end_generate(self, s: StreamExecutor) -> None:
        """Called at the end of an assistant role, for backends that generate a whole message at once."""
        return None

    def flush_cache(self) -> None:
        """Empty the backend's prefix cache."""
        return None

    def get_server_info(self) -> dict[str, Any]:
        return {}

    def shutdown(self) -> None:
        """Release what the backend holds (an engine it started, connections)."""
        return None
