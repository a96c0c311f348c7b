"""Llama-architecture decoder that an engine can run layer by layer on chosen rows.

Parameter names follow transformers' ``LlamaForCausalLM`` exactly, so a state dict moves between
the two unchanged. Every layer is split into the pieces an early-exit engine needs separately:
``qkv`` (norm, projections, RoPE), ``finish`` (output projection, residual, MLP) and ``kv`` (the
K/V-only path used to fill layers a row skipped). Attention itself is supplied by the caller, so
the same layer runs over a dense batch (training, parity tests) or a paged KV cache (the engine).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from testbed.model.config import LlamaConfig

# attend(layer_index, q, k, v) -> attention output shaped like q
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # computed in float32 as transformers does, so parity holds in half precision too
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions, shaped [*positions.shape, 1, head_dim]."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    )
    freqs = positions.float()[..., None] * inv_freq  # [..., head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [..., head_dim] (rotate-half layout)
    return emb.cos().to(dtype).unsqueeze(-2), emb.sin().to(dtype).unsqueeze(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        d, hq, hkv = cfg.head_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.num_heads, self.num_kv_heads, self.head_dim = hq, hkv, d
        self.q_proj = nn.Linear(cfg.hidden_size, hq * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(hq * d, cfg.hidden_size, bias=False)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def qkv(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [..., hidden] -> q [..., Hq, D], k and v [..., Hkv, D] with RoPE applied to q, k."""
        a = self.self_attn
        x = self.input_layernorm(h)
        q = a.q_proj(x).unflatten(-1, (a.num_heads, a.head_dim))
        k = a.k_proj(x).unflatten(-1, (a.num_kv_heads, a.head_dim))
        v = a.v_proj(x).unflatten(-1, (a.num_kv_heads, a.head_dim))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def kv(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V only (norm, K/V projection, RoPE): what a skipped layer owes the cache."""
        a = self.self_attn
        x = self.input_layernorm(h)
        k = a.k_proj(x).unflatten(-1, (a.num_kv_heads, a.head_dim))
        v = a.v_proj(x).unflatten(-1, (a.num_kv_heads, a.head_dim))
        return apply_rope(k, cos, sin), v

    def finish(self, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual adds around the output projection and the MLP; attn_out [..., Hq, D]."""
        h = h + self.self_attn.o_proj(attn_out.flatten(-2))
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Callable
    ) -> torch.Tensor:
        q, k, v = self.qkv(h, cos, sin)
        return self.finish(h, attend(q, k, v))


class _Backbone(nn.Module):
    # a separate module only so parameter names read "model.layers.0...", as in transformers
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def dense_causal_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over a right-padded dense batch: q [B, T, Hq, D], k/v [B, T, Hkv, D].

    With right padding, causality alone keeps real tokens from seeing the pads after them.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )  # [B, Hq, T, D]
    return out.transpose(1, 2)


class LlamaModel(nn.Module):
    """Decoder + shared exit head (final norm and LM head at any layer, LayerSkip style)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = _Backbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(token_ids)

    def rope(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.config.head_size, self.config.rope_theta, dtype)

    def lm_head_weight(self) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    def exit_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The shared exit head (final RMSNorm then LM head); exit adapters, when a checkpoint
        has them, are applied by the module-level ``exit_logits``."""
        return F.linear(self.model.norm(h), self.lm_head_weight())

    def dense_hidden_states(self, token_ids: torch.Tensor) -> list[torch.Tensor]:
        """Hidden state after each layer for a right-padded batch [B, T]: L tensors [B, T, hidden]."""
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        h = self.embed(token_ids)
        cos, sin = self.rope(positions, h.dtype)
        states = []
        for layer in self.layers:
            h = layer(h, cos, sin, dense_causal_attend)
            states.append(h)
        return states

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Full-depth logits [B, T, vocab] for a right-padded batch."""
        return self.exit_logits(self.dense_hidden_states(token_ids)[-1])


class ExitClassifiers(nn.Module):
    """What ``exit_heads.safetensors`` holds for each exit layer l: CALM's confidence probe
    sigmoid(w_l . n_l(h) + b_l) and, optionally, an exit adapter that replaces the shared final
    norm n(h) at that layer: n_l(h) = RMSNorm(h + h A_l B_l) with its own gain g_l (a rank-r
    correction plus a gain, trained by self-distillation on a frozen model). Without adapters
    every exit uses the model's own final norm and LM head (LayerSkip's logit lens)."""

    def __init__(self, num_layers: int, hidden_size: int, adapter_rank: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_layers, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_layers))
        self.adapter_rank = adapter_rank
        if adapter_rank is not None:
            self.norm_weight = nn.Parameter(torch.ones(num_layers, hidden_size))  # g_l
            self.down = nn.Parameter(torch.zeros(num_layers, hidden_size, adapter_rank))  # A_l
            self.up = nn.Parameter(torch.zeros(num_layers, adapter_rank, hidden_size))  # B_l

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    def adapts(self, layer: int) -> bool:
        """The last layer always exits through the model's own final norm."""
        return self.adapter_rank is not None and layer < self.num_layers

    def normed(self, layer: int, h: torch.Tensor, eps: float) -> torch.Tensor:
        """n_l(h) for h [..., hidden] at the 1-based exit layer l (which must adapt)."""
        i = layer - 1
        x = h + (h @ self.down[i].to(h.dtype)) @ self.up[i].to(h.dtype)
        return rms_norm(x, self.norm_weight[i].to(h.dtype), eps)

    def normed_stack(self, h: torch.Tensor, eps: float, layers: tuple[int, ...]) -> torch.Tensor:
        """n_l(h) at several adapting exit layers at once: h [K, rows, hidden], slice k at the
        1-based layer ``layers[k]``."""
        i = torch.tensor(layers, device=h.device) - 1
        a, b = self.down[i].to(h.dtype), self.up[i].to(h.dtype)
        x = h + torch.einsum("krj,kjh->krh", torch.einsum("krh,khj->krj", h, a), b)
        return rms_norm(x, self.norm_weight[i].to(h.dtype)[:, None, :], eps)

    def logit(self, layer: int, normed_h: torch.Tensor) -> torch.Tensor:
        """layer is the 1-based exit point; normed_h [rows, hidden] -> [rows]."""
        return normed_h @ self.weight[layer - 1] + self.bias[layer - 1]

    def prob(self, layer: int, normed_h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(layer, normed_h))


def exit_norm(
    model: LlamaModel, heads: ExitClassifiers | None, layer: int, h: torch.Tensor
) -> torch.Tensor:
    """The normed state the LM head reads at exit layer l: the layer's adapter when the
    checkpoint has one, else the shared final norm."""
    if heads is not None and heads.adapts(layer):
        return heads.normed(layer, h, model.config.rms_norm_eps)
    return model.model.norm(h)


def exit_norm_stack(
    model: LlamaModel,
    heads: ExitClassifiers | None,
    states: torch.Tensor,
    layers: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """exit_norm at several layers at once: states [K, rows, hidden], slice k at the 1-based
    layer ``layers[k]`` (default: every layer 1..L, so K = L)."""
    layers = tuple(range(1, states.shape[0] + 1)) if layers is None else layers
    return stacked_exit_norms(model.model.norm, heads, model.config.rms_norm_eps, states, layers)


def stacked_exit_norms(
    final_norm: Callable[[torch.Tensor], torch.Tensor],
    heads: ExitClassifiers | None,
    eps: float,
    states: torch.Tensor,
    layers: tuple[int, ...],
) -> torch.Tensor:
    """exit_norm_stack with the engine's own final norm (vLLM's differs from ours)."""
    final = final_norm(states)
    adapting = [k for k, layer in enumerate(layers) if heads is not None and heads.adapts(layer)]
    if not adapting:
        return final
    adapted = heads.normed_stack(states[adapting], eps, tuple(layers[k] for k in adapting))
    return final.index_copy(0, torch.tensor(adapting, device=states.device), adapted)


def exit_logits(
    model: LlamaModel, heads: ExitClassifiers | None, layer: int, h: torch.Tensor
) -> torch.Tensor:
    """LM-head logits of exiting at layer l: [rows, hidden] -> [rows, vocab]."""
    return F.linear(exit_norm(model, heads, layer, h), model.lm_head_weight())
