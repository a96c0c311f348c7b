"""Paged attention over scattered blocks equals dense attention over the same K/V."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from testbed.engine.kv_cache import (
    DecodeContext,
    KVCacheShape,
    PagedKVCache,
    decode_attention,
    span_attention,
)

HQ, HKV, D, BS = 6, 2, 8, 4


def _filled_cache(lengths, seed=0):
    """A cache holding sequences of the given lengths in shuffled blocks, and their dense K/V."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum((n + BS - 1) // BS for n in lengths) + 3
    cache = PagedKVCache(KVCacheShape(2, num_blocks, BS, HKV, D), torch.float32)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, dense = [], []
    for n in lengths:
        table = tuple(free.pop() for _ in range((n + BS - 1) // BS))
        k, v = torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)
        pos = torch.arange(n)
        slots = torch.tensor(table)[pos // BS] * BS + pos % BS
        cache.write(1, slots, k, v)
        tables.append(table)
        dense.append((k, v, slots))
    return cache, tables, dense


def _dense(q, k, v, mask=None):
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
    )
    return out.transpose(0, 1)


def test_decode_attention_equals_dense():
    lengths = [5, 17, 1, 9, 12, 3, 30, 8, 2, 11]  # more rows than one attention group
    cache, tables, dense = _filled_cache(lengths)
    q = torch.randn(len(lengths), HQ, D)
    ctx = DecodeContext.build(tables, lengths)
    got = decode_attention(cache, 1, q, ctx, torch.arange(len(lengths)))
    for i, (k, v, _) in enumerate(dense):
        expected = _dense(q[i : i + 1], k, v)
        torch.testing.assert_close(got[i : i + 1], expected, atol=1e-5, rtol=1e-5)


def test_span_attention_is_causal_and_equals_dense():
    cache, _, dense = _filled_cache([13])
    k, v, slots = dense[0]
    q = torch.randn(13, HQ, D)
    got = span_attention(cache, 1, q, torch.arange(13), slots)
    expected = _dense(q, k, v, torch.ones(13, 13, dtype=torch.bool).tril())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_invalid_cells_are_ignored():
    cache, tables, dense = _filled_cache([10])
    k, v, slots = dense[0]
    cache.invalidate(1, slots[3:6])
    q = torch.randn(1, HQ, D)
    got = decode_attention(cache, 1, q, DecodeContext.build(tables, [10]), torch.tensor([0]))
    keep = torch.ones(10, dtype=torch.bool)
    keep[3:6] = False
    torch.testing.assert_close(got, _dense(q, k[keep], v[keep]), atol=1e-5, rtol=1e-5)
