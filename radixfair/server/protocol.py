"""Request bodies of the HTTP API.

Types are checked here (a wrong type is a 400 naming the field), and so is every string's encoding
(JSON can carry a lone surrogate, "\\ud800", which nothing downstream can encode); value ranges are
left to `SamplingParams` and the engine, which already reject bad values with the field's name, so
the rules live in one place. Unknown top-level fields are ignored, as SGLang and OpenAI servers do
(clients send vendor extensions); unknown *sampling* fields are still an error in the engine. These
models are also the OpenAPI schema (`/openapi.json`) of the request bodies.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, WithJsonSchema

from radixfair.sampling_params import is_utf8


def _utf8(text: str) -> str:
    if not is_utf8(text):
        raise ValueError("not valid Unicode (a lone surrogate such as \\ud800)")
    return text


Text = Annotated[str, AfterValidator(_utf8)]

# Token ids are checked by the engine (type and range, after the request's size limits): validating
# a body of a million one-token prompts element by element here would cost seconds of event loop.
# The schema still says what they are.
TokenIds = Annotated[list[Any], WithJsonSchema(TypeAdapter(list[int] | list[list[int]]).json_schema())]
Prompt = Annotated[list[Any], WithJsonSchema(TypeAdapter(list[str] | list[int] | list[list[int]]).json_schema())]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SamplingParamsBody(BaseModel):
    """`sampling_params` of `/generate`, SGLang's names (radixfair.sampling_params.SamplingParams
    checks the values). Types are strict (`"5"` is not an integer); fields not named here pass
    through to SamplingParams, which refuses the unknown ones by name."""

    model_config = ConfigDict(extra="allow", strict=True)

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    seed: int | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    n: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.model_dump(exclude_unset=True), **(self.model_extra or {})}


class GenerateRequest(_Body):
    """`POST /generate` (SGLang's native API)."""

    text: Text | list[Text] | None = None
    input_ids: TokenIds | None = None
    sampling_params: SamplingParamsBody | list[SamplingParamsBody] | None = None
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    rid: Text | list[Text] | None = Field(default=None, description="request id(s), unique among the caller's "
                                                                      "requests in flight")

    def sampling_dicts(self) -> dict[str, Any] | list[dict[str, Any]] | None:
        sp = self.sampling_params
        if sp is None:
            return None
        return [p.to_dict() for p in sp] if isinstance(sp, list) else sp.to_dict()


class AbortRequest(_Body):
    rid: Text


class StreamOptions(_Body):
    include_usage: bool = False


class _OpenAISampling(_Body):
    model: Text | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: Text | list[Text] | None = None
    seed: int | None = None
    user: Text | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # SGLang's extensions to the OpenAI API
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    rid: Text | None = None
    # structured outputs: OpenAI's response_format, and SGLang's regex / ebnf extensions
    response_format: dict[str, Any] | None = None
    regex: Text | None = None
    ebnf: Text | None = None


class CompletionRequest(_OpenAISampling):
    """`POST /v1/completions`."""

    prompt: Text | Prompt
    max_tokens: int | None = 16  # OpenAI's default for legacy completions
    logprobs: int | None = None  # top-N per position (0: just the chosen token's)
    echo: bool = False


class ChatCompletionRequest(_OpenAISampling):
    """`POST /v1/chat/completions`."""

    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
