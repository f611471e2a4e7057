"""A request's output constraint (structured outputs) as the scheduler sees it: an opaque object the
engine attaches to a `Req`. The scheduler never looks inside: it reports each token the request
appends, asks whether the structure is complete, and asks for the continuation the grammar forces
(jump-forward), which it then computes as extend tokens. Pure Python, like the rest of `sched`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol


class JumpForward(NamedTuple):
    """Forced tokens to append after a sampled token. `replace_last`: the sampled token itself is
    replaced by `tokens[0]` (it merged with the forced text when the boundary was re-tokenized);
    its KV is not computed yet, so nothing computed is thrown away."""

    replace_last: bool
    tokens: tuple[int, ...]


class TokenConstraint(Protocol):
    def accept(self, token_id: int) -> bool:
        """Advance over a sampled token; False if the grammar does not allow it."""
        ...

    def is_terminated(self) -> bool:
        """The structure is complete and nothing may follow it: the request is done."""
        ...

    def jump_forward(self, last_token: int) -> JumpForward | None:
        """After `accept(last_token)`: the continuation the grammar forces, already accepted, or None
        (nothing forced, or jump-forward is off for this request)."""
        ...

    def suspend(self) -> None:
        """The request was retracted: its state may be dropped until `resume`."""
        ...

    def resume(self, output_ids: Sequence[int]) -> None:
        """The request is admitted again: rebuild the state from the tokens it has produced."""
        ...
