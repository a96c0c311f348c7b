"""Plain, obviously-correct greedy decoding of one sequence with a dense per-layer K/V list.

Used to evaluate the built-in model and as the reference the engine's tests compare against.
Optionally exits early: ``exit_layer_fn(layer, h, h_prev)`` returning True takes the token at that
layer and, like the ``copy`` fill policy, computes the skipped layers' K/V from the exit state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from testbed.model.llama import LlamaModel

ExitFn = Callable[[int, torch.Tensor, torch.Tensor], bool]


class _DenseCache:
    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # [T, Hkv, D]
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k])
            v = torch.cat([self.values[layer], v])
        self.keys[layer], self.values[layer] = k, v
        return k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [n, Hq, D] are the last n positions of k/v [T, Hkv, D]; causal within them."""
    n, total = q.shape[0], k.shape[0]
    mask = torch.ones(n, total, dtype=torch.bool).tril(diagonal=total - n)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
    )  # [Hq, n, D]
    return out.transpose(0, 1)


@torch.inference_mode()
def greedy_generate(
    model: LlamaModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    exit_fn: ExitFn | None = None,
) -> tuple[list[int], list[int]]:
    """Greedy continuation of one prompt; returns (tokens, exit layer per token)."""
    cache = _DenseCache(model.num_layers)
    ids = torch.tensor(prompt_ids)
    start = 0
    tokens: list[int] = []
    exits: list[int] = []
    for _ in range(max_new_tokens):
        positions = torch.arange(start, start + len(ids))
        h = model.embed(ids)
        cos, sin = model.rope(positions, h.dtype)
        exit_layer = model.num_layers
        for i, layer in enumerate(model.layers):
            q, k, v = layer.qkv(h, cos, sin)
            k_all, v_all = cache.append(i, k, v)
            h_prev, h = h, layer.finish(h, _attend(q, k_all, v_all))
            is_decode = start > 0
            if (
                exit_fn is not None
                and is_decode
                and i + 1 < model.num_layers
                and exit_fn(i + 1, h, h_prev)
            ):
                exit_layer = i + 1
                for j in range(i + 1, model.num_layers):  # copy fill from the exit state
                    cache.append(j, *model.layers[j].kv(h, cos, sin))
                break
        token = int(model.exit_logits(h[-1]).argmax())
        tokens.append(token)
        exits.append(exit_layer)
        if token == eos_token_id:
            break
        start += len(ids)
        ids = torch.tensor([token])
    return tokens, exits
