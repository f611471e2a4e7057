"""How `select` picks a choice from the model's logprobs of each choice's tokens.

Each method gets, per choice, the logprob entries of the choice's own tokens (`[logprob, token_id,
token_text]`, SGLang's shape), their mean (`normalized_prompt_logprobs`) and, for methods that ask
for them, the same tokens' logprobs without the program's text before them. The signatures are
SGLang's, so a method written for SGLang's frontend works here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LogprobEntry = Sequence[Any]  # [logprob | None, token_id, token_text | None]


@dataclass
class ChoicesDecision:
    decision: str
    meta_info: dict[str, Any] | None = None


class ChoicesSamplingMethod(ABC):
    @property
    def requires_unconditional_logprobs(self) -> bool:
        return False

    @abstractmethod
    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: list[list[LogprobEntry]],
        output_token_logprobs: list[list[LogprobEntry]],
        unconditional_token_logprobs: list[list[LogprobEntry]] | None = None,
    ) -> ChoicesDecision: ...


def _values(entries: Sequence[LogprobEntry]) -> list[float]:
    # a None logprob (a first token: nothing predicts it) counts as certain
    return [0.0 if e[0] is None else float(e[0]) for e in entries]


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # the first of equal scores


def _meta(normalized: list[float], inputs: list[list[LogprobEntry]],
          outputs: list[list[LogprobEntry]]) -> dict[str, Any]:
    return {"normalized_prompt_logprobs": normalized, "input_token_logprobs": inputs,
            "output_token_logprobs": outputs}


class TokenLengthNormalized(ChoicesSamplingMethod):
    """The choice whose tokens have the highest mean logprob."""

    def __call__(self, *, choices: list[str], normalized_prompt_logprobs: list[float],
                 input_token_logprobs: list[list[LogprobEntry]], output_token_logprobs: list[list[LogprobEntry]],
                 unconditional_token_logprobs: list[list[LogprobEntry]] | None = None) -> ChoicesDecision:
        best = _argmax(normalized_prompt_logprobs)
        return ChoicesDecision(choices[best], _meta(normalized_prompt_logprobs, input_token_logprobs,
                                                    output_token_logprobs))


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Token by token: keep the choices whose token at this position has the highest logprob, until
    one is left. A choice shorter than the others continues with its own mean logprob, so that a
    prefix of a longer choice is compared on equal terms."""

    def __call__(self, *, choices: list[str], normalized_prompt_logprobs: list[float],
                 input_token_logprobs: list[list[LogprobEntry]], output_token_logprobs: list[list[LogprobEntry]],
                 unconditional_token_logprobs: list[list[LogprobEntry]] | None = None) -> ChoicesDecision:
        rows = [_values(entries) for entries in input_token_logprobs]
        width = max(len(r) for r in rows)
        matrix = [r + [sum(r) / len(r) if r else 0.0] * (width - len(r)) for r in rows]
        remaining = list(range(len(choices)))
        for j in range(width):
            best = max(matrix[i][j] for i in remaining)
            remaining = [i for i in remaining if matrix[i][j] == best]
            if len(remaining) == 1:
                break
        meta = _meta(normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs)
        meta["greedy_logprob_matrix"] = matrix
        return ChoicesDecision(choices[remaining[0]], meta)


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """The choice whose tokens gain the most from the context: the mean of (logprob of a token
    after the program's text) minus (its logprob after only the choice's earlier tokens), so a
    choice that is likely anywhere does not win for that alone."""

    @property
    def requires_unconditional_logprobs(self) -> bool:
        return True

    def __call__(self, *, choices: list[str], normalized_prompt_logprobs: list[float],
                 input_token_logprobs: list[list[LogprobEntry]], output_token_logprobs: list[list[LogprobEntry]],
                 unconditional_token_logprobs: list[list[LogprobEntry]] | None = None) -> ChoicesDecision:
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs the unconditional token logprobs")
        scores = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs, strict=True):
            diffs = [a - b for a, b in zip(_values(cond), _values(uncond), strict=True)]
            scores.append(sum(diffs) / len(diffs) if diffs else 0.0)
        meta = _meta(normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs)
        meta["unconditional_token_logprobs"] = unconditional_token_logprobs
        meta["normalized_unconditional_prompt_logprobs"] = scores
        return ChoicesDecision(choices[_argmax(scores)], meta)


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
