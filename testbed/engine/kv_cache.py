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


def kv_mb_for_tokens(cfg, num_tokens: int) -> float:
    """K/V memory (float32: an upper bound for narrower dtypes) for ``num_tokens`` positions in
    every layer of a model of LlamaConfig ``cfg``."""
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_size * 4
    return num_tokens * per_token / 2**20


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
    def __init__(
        self, shape: KVCacheShape, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> None:
        self.shape = shape
        size = (
            shape.num_layers,
            shape.num_blocks,
            shape.block_size,
            shape.num_kv_heads,
            shape.head_dim,
        )
        self.device = torch.device(device)
        self.keys = torch.zeros(size, dtype=dtype, device=device)  # [layers, blocks, bs, Hkv, D]
        self.values = torch.zeros(size, dtype=dtype, device=device)
        self.is_valid = torch.zeros(
            shape.num_layers, shape.num_slots, dtype=torch.bool, device=device
        )

    def slot_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as [slots, Hkv, D] views."""
        flat = (self.shape.num_slots, self.shape.num_kv_heads, self.shape.head_dim)
        return self.keys[layer].view(flat), self.values[layer].view(flat)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots [n] int64; k, v [n, Hkv, D]."""
        keys, values = self.slot_view(layer)
        keys[slots] = k
        values[slots] = v
        self.is_valid[layer, slots] = True

    def invalidate(self, layer: int, slots: torch.Tensor) -> None:
        self.is_valid[layer, slots] = False


@dataclass(frozen=True)
class DecodeContext:
    """Gather plan for rows that each attend with one query over their own context, by block:
    copying whole blocks is about twice as fast as gathering slot by slot."""

    block_tables: torch.Tensor  # [rows, max_blocks] int64, padded with block 0
    context_lens: torch.Tensor  # [rows] positions 0..len-1 are the row's context

    @classmethod
    def build(
        cls, tables: list[tuple[int, ...]], context_lens: list[int],
        device: torch.device | str = "cpu",
    ) -> DecodeContext:  # fmt: skip
        width = max(len(t) for t in tables)
        padded = torch.zeros(len(tables), width, dtype=torch.long)
        for i, t in enumerate(tables):
            padded[i, : len(t)] = torch.tensor(t)
        return cls(padded.to(device), torch.tensor(context_lens, device=device))


GROUP_ROWS = 8  # rows per attention call: sorted by context length, so padding stays small


def decode_attention(
    cache: PagedKVCache, layer: int, q: torch.Tensor, ctx: DecodeContext, rows: torch.Tensor
) -> torch.Tensor:
    """One query per row over its paged context: q [n, Hq, D] for rows [n] of ctx -> [n, Hq, D]."""
    bs = cache.shape.block_size
    out = torch.empty_like(q)
    lens = ctx.context_lens[rows]
    order = lens.argsort()
    valid = cache.is_valid[layer].view(-1, bs)  # [blocks, block_size]
    for start in range(0, len(order), GROUP_ROWS):
        sel = order[start : start + GROUP_ROWS]  # indices into q
        num_blocks = (int(lens[sel].max()) + bs - 1) // bs
        blocks = ctx.block_tables[rows[sel], :num_blocks].reshape(-1)
        width = num_blocks * bs
        k = cache.keys[layer].index_select(0, blocks).view(len(sel), width, -1, q.shape[-1])
        v = cache.values[layer].index_select(0, blocks).view(len(sel), width, -1, q.shape[-1])
        mask = torch.arange(width, device=q.device)[None, :] < lens[sel][:, None]
        mask &= valid.index_select(0, blocks).view(len(sel), width)  # [group, width]
        out[sel] = F.scaled_dot_product_attention(
            q[sel].unsqueeze(2),  # [group, Hq, 1, D]
            k.transpose(1, 2),  # [group, Hkv, width, D]
            v.transpose(1, 2),
            attn_mask=mask[:, None, None, :],
            enable_gqa=True,
        ).squeeze(2)
    return out


def span_attention(
    cache: PagedKVCache,
    layer: int,
    q: torch.Tensor,
    q_positions: torch.Tensor,
    ctx_slots: torch.Tensor,
) -> torch.Tensor:
    """Several queries of one sequence (a prefill chunk, or deferred positions riding along)
    over its context 0..len(ctx_slots)-1, causally: q [n, Hq, D] at q_positions [n]."""
    keys, values = cache.slot_view(layer)
    k = keys.index_select(0, ctx_slots).transpose(0, 1)  # [Hkv, ctx, D]
    v = values.index_select(0, ctx_slots).transpose(0, 1)
    key_pos = torch.arange(len(ctx_slots), device=q.device)
    mask = (key_pos[None, :] <= q_positions[:, None]) & cache.is_valid[layer][ctx_slots][None, :]
    is_grouped = q.device.type != "cpu"
    if not is_grouped:
        # CPU's SDPA takes its slow math path for grouped K/V heads (enable_gqa); with the heads
        # repeated it takes its flash kernel: 1.6-2x faster on 128-512-token prefill chunks
        # (measured on this project's 2-core machine). One decode query per row gains nothing
        # from it: decode_attention keeps enable_gqa.
        rep = q.shape[1] // k.shape[0]
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k[None],
        v[None],
        attn_mask=mask[None, None],
        enable_gqa=is_grouped,
    )[0]  # [Hq, n, D]
    return out.transpose(0, 1)
