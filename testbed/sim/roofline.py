"""Roofline cost model: a named GPU's peak FLOP/s and memory bandwidth against a model shape.

Every kernel takes max(FLOPs / peak, bytes / bandwidth). A layer's weights are read once per
step however many rows run it, so a decode step of 64 rows costs little more than one of a single
row; that is why grouped early exit pays on GPUs and why the model charges per layer, not per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from testbed.sim.cost_base import CostModelError, StepFeatures, spread_layers
from testbed.sim.hardware import GPU_ALIASES, GPUS, MODEL_PRESETS, GpuSpec, ModelShape, gpu_spec

__all__ = [
    "GPUS",
    "GPU_ALIASES",
    "MODEL_PRESETS",
    "GpuSpec",
    "ModelShape",
    "RooflineCostModel",
    "gpu_spec",
    "kv_read_tokens",
]


def kv_read_tokens(context: np.ndarray, num_context_tokens: int) -> np.ndarray:
    """Per layer, the K/V positions actually read from memory.

    ``context`` [layers] sums the context of every token (what attention FLOPs scale with); a
    prefill chunk's tokens share one read of their row's K/V (flash attention), so the bytes
    follow the per-row context ``num_context_tokens`` instead. Prefill rows run every layer, so
    what a layer lacks against the fullest layer belongs to decode rows that exited, for which
    per-token and per-row context agree. Exact for pure decode and pure prefill steps.
    """
    per_row = num_context_tokens - (context.max() - context)
    return np.minimum(np.maximum(per_row, 0.0), context)


@dataclass(frozen=True)
class RooflineCostModel:
    """Step time = overhead_s + Σ_layers kernel(layer) + Σ_layers kernel(fill) + LM head kernels,
    kernel(FLOPs, bytes) = max(FLOPs / peak_flops_per_s, bytes / memory_bytes_per_s) / efficiency.

    Per layer ℓ of the target model (trace layers mapped by relative depth when depths differ),
    with t tokens running it fully, c the sum of their attended context lengths, r the K/V
    positions read (see kv_read_tokens) and k K/V-only (copy fill) tokens:

    - layer: FLOPs = 2·t·params_per_layer + 4·c·num_heads·head_dim  (QKᵀ and PV: one multiply-add
      = 2 FLOPs each); bytes = [t > 0]·params_per_layer·bytes_per_param (weights read once per step)
      + r·kv_bytes_per_token (K/V read) + t·kv_bytes_per_token (K/V written).
    - fill: FLOPs = 2·k·kv_proj_params; bytes = [k > 0]·kv_proj_params·bytes_per_param
      + k·kv_bytes_per_token. A separate kernel after the exit decision, so it re-reads the weights.
    - LM head: one per row (num_rows; a non-final prefill chunk or a parked row samples nothing, so
      this errs high by those) and one per softmax-rule evaluation, each a kernel of
      FLOPs = 2·hidden·vocab·n and bytes = hidden·vocab·bytes_per_param (weights once per step).
      The hidden and classifier rules cost O(hidden) per evaluation and are not charged.
    Prefill attention FLOPs are exact only if the replay runner sums per-token context (it does).
    """

    gpu: GpuSpec
    shape: ModelShape
    overhead_s: float = 0.0  # fixed per-step cost: launch, scheduling, sampling
    efficiency: float = 1.0  # achieved fraction of peak FLOP/s and bandwidth; 1.0 = pure roofline
    name: str = field(default="roofline", init=False)
    # memo of relative-depth matrices by trace depth; not part of the model's value
    _spread_cache: dict[int, np.ndarray] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # memos of _layer_groups and _whole_layers by trace depth; not part of the model's value
    _group_cache: dict[int, tuple] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _whole_cache: dict[int, tuple | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def max_context_tokens(self) -> int | None:
        return self.shape.max_context_tokens

    def __post_init__(self) -> None:
        if not 0 < self.efficiency <= 1:
            raise CostModelError(f"roofline efficiency must be in (0, 1], got {self.efficiency}")
        if not self.overhead_s >= 0:
            raise CostModelError(f"roofline overhead_s must be >= 0, got {self.overhead_s}")

    @cached_property
    def _unit_s(self) -> np.ndarray:
        """[4, 6] seconds per unit, at the achieved rates. Rows: layer compute, layer memory,
        fill compute, fill memory; columns: tokens, context, K/V read, K/V-only tokens,
        [tokens > 0], [K/V-only > 0] (the weight reads)."""
        s = self.shape
        peak_s = 1 / (self.gpu.peak_flops_per_s * self.efficiency)  # s per FLOP
        byte_s = 1 / (self.gpu.memory_bytes_per_s * self.efficiency)  # s per byte
        kv_s = s.kv_bytes_per_token * byte_s
        layer_weights_s = s.params_per_layer * s.bytes_per_param * byte_s
        kv_weights_s = s.kv_proj_params * s.bytes_per_param * byte_s
        return np.array([
            [2 * s.params_per_layer * peak_s, 4 * s.num_heads * s.head_dim * peak_s, 0, 0, 0, 0],
            [kv_s, 0, kv_s, 0, layer_weights_s, 0],
            [0, 0, 0, 2 * s.kv_proj_params * peak_s, 0, 0],
            [0, 0, 0, kv_s, 0, kv_weights_s],
        ])  # fmt: skip

    def _work_s(self, work: np.ndarray) -> float:
        """work [4, layers]: tokens, attended context, K/V read, K/V-only tokens per layer."""
        secs = self._unit_s @ np.concatenate([work, work[[0, 3]] > 0])  # [4, layers]
        return float(np.maximum(secs[0], secs[1]).sum() + np.maximum(secs[2], secs[3]).sum())

    def layer_time_s(
        self, num_tokens: float, num_context_tokens: float, *, num_kv_only_tokens: float = 0
    ) -> float:
        """One layer in one step: num_tokens run it attending num_context_tokens in total, read
        as one token per row (decode); num_kv_only_tokens only fill their K/V there."""
        column = [[num_tokens], [num_context_tokens], [num_context_tokens], [num_kv_only_tokens]]
        return self._work_s(np.array(column, dtype=np.float64))

    def lm_head_time_s(self, num_vectors: int) -> float:
        """num_vectors hidden states through the LM head in one kernel."""
        if num_vectors <= 0:
            return 0.0
        flops_per_vector, memory_s = self._lm_head
        compute_s = flops_per_vector * num_vectors / self.gpu.peak_flops_per_s
        return max(compute_s, memory_s) / self.efficiency

    @cached_property
    def _lm_head(self) -> tuple[float, float]:
        """FLOPs per vector and weight-read seconds of the LM head (computed once per model)."""
        p = self.shape.lm_head_params
        return 2.0 * p, p * self.shape.bytes_per_param / self.gpu.memory_bytes_per_s

    def _spread_matrix(self, num_source: int) -> np.ndarray:
        """[L_src, L_tgt]: spread_layers is linear, so one matrix maps every row of counts."""
        if num_source not in self._spread_cache:
            unit_counts = np.eye(num_source)  # row i: one count in source layer i
            self._spread_cache[num_source] = spread_layers(unit_counts, self.shape.num_layers)
        return self._spread_cache[num_source]

    def _layer_work(self, f: StepFeatures) -> np.ndarray:
        """[4, L_tgt] float: tokens, attended context, K/V read, K/V-only tokens per layer."""
        if not len(f.layer_tokens) == len(f.layer_context_tokens) == len(f.layer_kv_only_tokens):
            raise CostModelError("step features: per-layer tuples differ in length")
        if not f.layer_tokens:
            raise CostModelError("step features: no per-layer counts (a trace has >= 1 layer)")
        tokens, context, kv_only = np.array(
            (f.layer_tokens, f.layer_context_tokens, f.layer_kv_only_tokens), dtype=np.float64
        )  # [3, L_src]
        work = np.stack([tokens, context, kv_read_tokens(context, f.num_context_tokens), kv_only])
        if work.shape[1] != self.shape.num_layers:
            work = work @ self._spread_matrix(work.shape[1])  # [4, L_tgt]
        return work

    def reference_step_time_s(self, f: StepFeatures) -> float:
        """step_time_s as the matrix form above: the reference its plain-Python path must equal
        (up to rounding; tests/test_sim_fastpath.py)."""
        total_s = self._work_s(self._layer_work(f)) + self.lm_head_time_s(f.num_rows)
        if f.rule == "softmax":
            total_s += self.lm_head_time_s(f.num_rule_evals)
        return self.overhead_s + total_s

    def step_time_s(self, f: StepFeatures) -> float:
        # Plain Python: a typical step has few rows, and numpy's per-call overhead cost more than
        # the arithmetic. Target layers fed by the same trace layers cost the same, and so do
        # consecutive trace layers with equal counts, so each distinct layer is priced once.
        tokens, context, kv_only = f.layer_tokens, f.layer_context_tokens, f.layer_kv_only_tokens
        if not len(tokens) == len(context) == len(kv_only):
            raise CostModelError("step features: per-layer tuples differ in length")
        if not tokens:
            raise CostModelError("step features: no per-layer counts (a trace has >= 1 layer)")
        top, n = max(context), f.num_context_tokens
        total_s, layer_s = 0.0, 0.0
        whole = self._whole_layers(len(tokens))
        if whole is not None:  # every target layer repeats one trace layer (8 → 32: 4 each)
            a_t, a_c, m_kv, m_w, f_k, g_kv, g_w = self._coefficients
            last_t = last_c = last_k = None
            for count, t, c, k in zip(whole, tokens, context, kv_only, strict=True):
                if t != last_t or c != last_c or k != last_k:  # else: the previous layer's price
                    # _layer_s and kv_read_tokens inlined, max and min as comparisons (the
                    # same values): this loop runs for every simulated step
                    read = n - (top - c)
                    read = 0 if read < 0 else (read if read <= c else c)
                    compute_s, memory_s = a_t * t + a_c * c, m_kv * t + m_kv * read
                    if t > 0:
                        memory_s += m_w
                    layer_s = compute_s if compute_s >= memory_s else memory_s
                    compute_s, memory_s = f_k * k, g_kv * k
                    if k > 0:
                        memory_s += g_w
                    layer_s += compute_s if compute_s >= memory_s else memory_s
                    last_t, last_c, last_k = t, c, k
                total_s += count * layer_s
        else:  # some target layers straddle trace layers: price each group's weighted mix
            reads = [min(max(n - (top - c), 0), c) for c in context]
            for count, sources in self._layer_groups(len(tokens)):
                t = c = r = k = 0.0
                for i, w in sources:
                    t, c, r = t + w * tokens[i], c + w * context[i], r + w * reads[i]
                    k += w * kv_only[i]
                total_s += count * self._layer_s(t, c, r, k)
        total_s += self.lm_head_time_s(f.num_rows)
        if f.rule == "softmax":
            total_s += self.lm_head_time_s(f.num_rule_evals)
        return self.overhead_s + total_s

    def _layer_s(self, tokens: float, context: float, read: float, kv_only: float) -> float:
        """One target layer: its kernel plus its K/V-fill kernel (see the class docstring)."""
        a_t, a_c, m_kv, m_w, f_k, g_kv, g_w = self._coefficients
        layer_s = max(a_t * tokens + a_c * context,
                      m_kv * tokens + m_kv * read + (m_w if tokens > 0 else 0.0))  # fmt: skip
        return layer_s + max(f_k * kv_only, g_kv * kv_only + (g_w if kv_only > 0 else 0.0))

    @cached_property
    def _coefficients(self) -> tuple[float, ...]:
        """The non-zero entries of _unit_s, by name: layer compute per token and per context
        token, layer memory per K/V token and its weights, fill compute, fill memory, weights."""
        u = self._unit_s
        assert u[1, 0] == u[1, 2], "K/V written and read cost the same per token"
        return tuple(
            float(x) for x in (u[0, 0], u[0, 1], u[1, 0], u[1, 4], u[2, 3], u[3, 3], u[3, 5])
        )

    def _whole_layers(self, num_source: int) -> tuple[int, ...] | None:
        """Per trace layer, how many target layers repeat it whole, when each target layer is
        one whole trace layer (depths equal, or the target a multiple of the trace); else None."""
        if num_source not in self._whole_cache:
            groups = self._layer_groups(num_source)
            is_whole = all(len(src) == 1 and src[0][1] == 1.0 for _, src in groups)
            is_whole = is_whole and [src[0][0] for _, src in groups] == list(range(num_source))
            whole = tuple(count for count, _ in groups) if is_whole else None
            self._whole_cache[num_source] = whole
        return self._whole_cache[num_source]

    def _layer_groups(
        self, num_source: int
    ) -> tuple[tuple[int, tuple[tuple[int, float], ...]], ...]:
        """Target layers as (how many, ((source layer, weight), ...)), consecutive identical
        layers merged: 8 trace layers on 32 target layers are 8 groups of 4 one-source layers."""
        if num_source not in self._group_cache:
            if num_source == self.shape.num_layers:
                spread = np.eye(num_source)
            else:
                spread = self._spread_matrix(num_source)
            groups: list[tuple[int, tuple[tuple[int, float], ...]]] = []
            for column in spread.T:  # [L_src] weights of one target layer
                sources = tuple((int(i), float(column[i])) for i in np.flatnonzero(column))
                if groups and groups[-1][1] == sources:
                    groups[-1] = (groups[-1][0] + 1, sources)
                else:
                    groups.append((1, sources))
            self._group_cache[num_source] = tuple(groups)
        return self._group_cache[num_source]
