"""Paged K/V tensors per layer, with slot writes, gathers and the attention that reads them.

Slots are ``block * block_size + offset`` (see testbed.core.block_manager); every layer shares
the sequence's block table. ``is_valid[layer, slot]`` says whether that cell holds K/V computed
for its current owner: the ``skip`` fill policy (and ``lazy``/``recompute`` until resolved) leaves
cells invalid, and attention ignores them instead of reading stale data of an earlier owner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


class PagedKVCache:
    def __init__(self, shape: KVCacheShape, dtype: torch.dtype) -> None:
        self.shape = shape
        size = (shape.num_layers, shape.num_slots, shape.num_kv_heads, shape.head_dim)
        self.keys = torch.zeros(size, dtype=dtype)  # [layers, slots, Hkv, D]
        self.values = torch.zeros(size, dtype=dtype)
        self.is_valid = torch.zeros(shape.num_layers, shape.num_slots, dtype=torch.bool)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots [n] int64; k, v [n, Hkv, D]."""
        self.keys[layer, slots] = k
        self.values[layer, slots] = v
        self.is_valid[layer, slots] = True

    def invalidate(self, layer: int, slots: torch.Tensor) -> None:
        self.is_valid[layer, slots] = False


@dataclass(frozen=True)
class DecodeContext:
    """Gather plan for rows that each attend with one query over their own context."""

    slots: torch.Tensor  # [rows, max_ctx] int64, padded with slot 0
    in_context: torch.Tensor  # [rows, max_ctx] bool: position j < the row's context length

    @classmethod
    def build(cls, contexts: list[torch.Tensor]) -> DecodeContext:
        """contexts: per row, the slots of positions 0..end-1 in order."""
        width = max(len(c) for c in contexts)
        slots = torch.zeros(len(contexts), width, dtype=torch.long)
        mask = torch.zeros(len(contexts), width, dtype=torch.bool)
        for i, c in enumerate(contexts):
            slots[i, : len(c)] = c
            mask[i, : len(c)] = True
        return cls(slots, mask)

    def select(self, rows: torch.Tensor) -> DecodeContext:
        return DecodeContext(self.slots[rows], self.in_context[rows])


def decode_attention(
    cache: PagedKVCache, layer: int, q: torch.Tensor, ctx: DecodeContext
) -> torch.Tensor:
    """One query per row over its paged context: q [rows, Hq, D] -> [rows, Hq, D]."""
    k = cache.keys[layer][ctx.slots]  # [rows, ctx, Hkv, D]
    v = cache.values[layer][ctx.slots]
    mask = ctx.in_context & cache.is_valid[layer][ctx.slots]  # [rows, ctx]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [rows, Hq, 1, D]
        k.transpose(1, 2),  # [rows, Hkv, ctx, D]
        v.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        enable_gqa=True,
    )  # [rows, Hq, 1, D]
    return out.squeeze(2)


def span_attention(
    cache: PagedKVCache,
    layer: int,
    q: torch.Tensor,
    q_positions: torch.Tensor,
    ctx_slots: torch.Tensor,
) -> torch.Tensor:
    """Several queries of one sequence (a prefill chunk, or deferred positions riding along)
    over its context 0..len(ctx_slots)-1, causally: q [n, Hq, D] at q_positions [n]."""
    k = cache.keys[layer][ctx_slots].transpose(0, 1)  # [Hkv, ctx, D]
    v = cache.values[layer][ctx_slots].transpose(0, 1)
    key_pos = torch.arange(len(ctx_slots))
    mask = (key_pos[None, :] <= q_positions[:, None]) & cache.is_valid[layer][ctx_slots][None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k, v, attn_mask=mask[None], enable_gqa=True
    )  # [Hq, n, D]
    return out.transpose(0, 1)
