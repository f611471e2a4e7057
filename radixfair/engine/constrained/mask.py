"""Token masks on the logits: applied only to the constrained rows of a batch, so constrained and
unconstrained requests sample together."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from radixfair.engine.constrained.base import Bitmask


@dataclass(frozen=True)
class TokenMask:
    """Allowed next tokens for some rows of a batch's sampling logits."""

    rows: torch.Tensor  # [k] row indices into the sampling logits
    allowed: torch.Tensor  # [k, vocab] bool

    def for_row(self, row: int) -> TokenMask | None:
        """The mask of sampling row `row` alone (as row 0), or None if that row is unconstrained."""
        hits = (self.rows == row).nonzero().view(-1)
        if len(hits) == 0:
            return None
        j = int(hits[0])
        return TokenMask(torch.zeros(1, dtype=self.rows.dtype, device=self.rows.device), self.allowed[j : j + 1])


def unpack_bitmask(bitmask: Bitmask, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[k, words] int32 bitmask -> [k, vocab] bool on `device`."""
    if device.type == "cpu":
        unpacked = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(unpacked[:, :vocab_size]).bool()
    words = torch.from_numpy(bitmask).to(device, non_blocking=True)
    shifts = torch.arange(32, device=device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.view(words.shape[0], -1)[:, :vocab_size].bool()


@torch.inference_mode()  # the model's logits are inference tensors: updated in place only in that mode
def apply_token_mask(logits: torch.Tensor, mask: TokenMask, unbanned: torch.Tensor) -> None:
    """Disallowed tokens of the masked rows to -inf, in place. A row whose allowed tokens were all
    banned before (`min_new_tokens` bans the stop tokens, but the grammar allows nothing else) takes
    its allowed logits from `unbanned` (the logits before those bans): the grammar wins, and no row
    is ever left without a token to sample."""
    masked = logits.index_select(0, mask.rows).masked_fill_(~mask.allowed, float("-inf"))
    dead = torch.isneginf(masked).all(dim=1)
    if bool(dead.any()):
        idx = dead.nonzero().view(-1)
        masked[idx] = unbanned.index_select(0, mask.rows[idx]).masked_fill(~mask.allowed[idx], float("-inf"))
    logits.index_copy_(0, mask.rows, masked)
