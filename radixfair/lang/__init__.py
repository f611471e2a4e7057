"""The frontend language: SGLang's programming interface over radixfair.

A program is a Python function `f(s, ...)` decorated with `@function`; it appends text and
generation steps to its state `s` (`s += "Q: " + q + gen("answer", stop="\\n")`), forks it into
parallel branches, and reads what the model produced (`s["answer"]`). Each state runs its steps on
its own worker, in order, so independent states and fork branches run in parallel and reach the
server as one batch that shares its prefixes through the radix cache.

The names and signatures are SGLang's (`import radixfair as sgl` runs an SGLang program).
Backends: `RuntimeEndpoint(url)` (a server's native HTTP API), `Runtime(...)` (an engine in this
process), `InProcessBackend(engine)`, or `OpenAI(model, base_url=...)` (any OpenAI-style `/v1` API,
with API speculative execution: `@function(num_api_spec_tokens=N)`). Nothing here imports torch until an in-process engine is
built.
"""

from radixfair.lang.api import (
    Runtime,
    assistant,
    assistant_begin,
    assistant_end,
    flush_cache,
    function,
    gen,
    gen_int,
    gen_string,
    get_server_info,
    image,
    select,
    set_default_backend,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
    video,
)
from radixfair.lang.backend.base import Backend
from radixfair.lang.backend.inprocess import InProcessBackend
from radixfair.lang.backend.openai import OpenAI
from radixfair.lang.backend.runtime_endpoint import RuntimeEndpoint
from radixfair.lang.chat_template import ChatTemplate, get_chat_template
from radixfair.lang.choices import (
    ChoicesDecision,
    ChoicesSamplingMethod,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from radixfair.lang.config import global_config
from radixfair.lang.errors import BackendError
from radixfair.lang.interpreter import ProgramState, ProgramStateGroup
from radixfair.lang.program import SglFunction
from radixfair.lang.tracer import ProgramTrace
from radixfair.lang.usage import UsageCounts

__all__ = [
    "Backend",
    "BackendError",
    "ChatTemplate",
    "ChoicesDecision",
    "ChoicesSamplingMethod",
    "InProcessBackend",
    "OpenAI",
    "ProgramState",
    "ProgramStateGroup",
    "ProgramTrace",
    "Runtime",
    "RuntimeEndpoint",
    "SglFunction",
    "UsageCounts",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "flush_cache",
    "function",
    "gen",
    "gen_int",
    "gen_string",
    "get_chat_template",
    "get_server_info",
    "global_config",
    "greedy_token_selection",
    "image",
    "select",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "token_length_normalized",
    "unconditional_likelihood_normalized",
    "user",
    "user_begin",
    "user_end",
    "video",
]
