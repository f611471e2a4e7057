"""Tensors one forward pass needs, built by the model runner from a scheduled batch."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class ForwardMode(enum.Enum):
    PREFILL = "prefill"  # extend: new tokens attend to a cached prefix plus themselves (causal)
    DECODE = "decode"  # one new token per request
    MIXED = "mixed"  # prefill sequences first (`seqs`), then decode rows (`decode_groups`) from `decode_start`


@dataclass
class PrefillSeq:
    """One request's slice of a prefill batch."""

    q_start: int  # offset of its extend tokens in the flat token dimension
    q_len: int  # extend tokens
    prefix_len: int  # tokens already in the KV pool before this pass
    kv_index: torch.Tensor | None  # slots of all prefix_len + q_len tokens; None when prefix_len == 0
    # [q_len, prefix_len + q_len] additive mask (query i sees keys 0 .. prefix_len + i), built once
    # per batch rather than in every layer; None when prefix_len == 0 (plain causal)
    mask: torch.Tensor | None = None


@dataclass
class DecodeGroup:
    """Requests of a decode batch whose sequences are padded to a common length together."""

    index: torch.Tensor | None  # rows of the batch in this group; None: the whole batch, in order
    kv_index: torch.Tensor  # [b, Lmax] slots of each sequence (padding points at a valid slot)
    kv_mask: torch.Tensor  # [1, b, 1, Lmax] additive float mask (0 or -inf)
    # Cascade attention: slots of a prefix every sequence of the group shares (a document, a
    # few-shot preamble). It is gathered and multiplied once for the group; kv_index/kv_mask
    # then cover only each sequence's own tokens after it.
    shared_index: torch.Tensor | None = None  # [Lp]


@dataclass
class WorkspaceStep:
    """What a decode pass's attention needs to read the decode workspace (built by
    `radixfair.engine.decode_workspace.DecodeWorkspace.prepare`)."""

    k: list[torch.Tensor]  # per layer [rows_cap, kv_heads, head_dim, capacity]: transposed
    v: list[torch.Tensor]  # per layer [rows_cap, kv_heads, capacity, head_dim]
    slots: torch.Tensor  # [B] int64 workspace row of each batch row
    lens: torch.Tensor  # [B] int64 context of each batch row, its new token included
    # the C kernel (`radixfair.engine.decode_attention`) writes the new K/V and attends; the fields
    # below are for the tensor-op path only and are None with it
    native: bool
    write_index: torch.Tensor | None  # [B * kv_heads] flat (row, head, position) of each new token's V
    k_write: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (row, head, position) of each new key
    rows: torch.Tensor | None  # [B] workspace row of each batch row; None: rows 0..B-1 in order
    width: int  # rows 0..width-1 are multiplied (rows not in the batch attend to their position 0)
    lmax: int  # columns multiplied: the longest context in the batch
    mask: torch.Tensor | None  # [width * kv_heads, 1, lmax] additive (0 or -inf), in the model's dtype
    # (start, end, columns): workspace rows start..end-1 are read up to `columns` (rows sorted by length)
    groups: tuple[tuple[int, int, int], ...]


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [T] flat
    positions: torch.Tensor  # [T]
    out_slots: torch.Tensor  # [T] KV slots the new tokens are written to
    logits_index: torch.Tensor  # [N] flat positions whose hidden states go through the LM head
    # decode and mixed: the (decode part of the) batch split into groups of similar sequence length (less padding)
    decode_groups: list[DecodeGroup] | None = None
    # prefill and mixed
    seqs: list[PrefillSeq] | None = None
    # mixed only: the first decode token in the flat token dimension
    decode_start: int = 0
    # decode and mixed: attend to the decode workspace in place of `decode_groups` (no gather)
    workspace: WorkspaceStep | None = None
