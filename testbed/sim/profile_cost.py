"""Profile cost model: measured per-operator times in Vidur's CSV form, interpolated.

Vidur (microsoft/vidur, ``data/profiling/compute/<gpu>/<model>/mlp.csv``) profiles each operator
of one decoder layer against ``num_tokens``; column ``time_stats.<op>.median`` is in ms. A step
costs, per layer, the sum of the per-layer operators at the tokens that ran the layer. The
``mlp.csv`` files hold no attention kernel (Vidur keeps those in a separate attention profile)
and no LM head, so with them attention over the context and the LM head are NOT charged; if a
CSV carries ``attn_prefill``/``attn_decode`` columns they are read against the layer's context.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from testbed.sim.cost_base import CostModelError, StepFeatures, spread_layers
from testbed.sim.hardware import MODEL_PRESETS, ModelShape

log = logging.getLogger(__name__)

_MEDIAN_PREFIX, _MEDIAN_SUFFIX = "time_stats.", ".median"
STEP_OPS = frozenset({"emb"})  # the embedding runs once per step, not per layer
CONTEXT_OPS = frozenset({"attn_prefill", "attn_decode"})  # scale with context, not new tokens
# what a K/V-only (copy fill) token still runs in a layer: norm, QKV projection, RoPE, cache save
FILL_OPS = frozenset({"input_layernorm", "attn_pre_proj", "attn_rope", "attn_kv_cache_save"})
_TP_COLUMN = "num_tensor_parallel_workers"
_SHAPE_COLUMNS = ("n_embd", "n_expanded_embd", "n_head", "n_kv_head")


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise CostModelError(f"profile CSV {path} does not exist")
    try:
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CostModelError(f"profile CSV {path} cannot be read: {exc}") from exc
    if len(rows) < 2:
        raise CostModelError(f"profile CSV {path} has no data rows")
    header, body = rows[0], [r for r in rows[1:] if r]
    if "num_tokens" not in header:
        raise CostModelError(f"profile CSV {path} has no num_tokens column")
    if _TP_COLUMN in header:  # one GPU: later tensor-parallel shards are cheaper per op
        body = [r for r in body if r[header.index(_TP_COLUMN)].strip() in ("1", "1.0")]
        if not body:
            raise CostModelError(f"profile CSV {path} has no rows for {_TP_COLUMN} = 1")
    return header, body


def _column(path: Path, header: list[str], body: list[list[str]], name: str) -> np.ndarray:
    i = header.index(name)
    try:
        return np.array([float(r[i]) for r in body])
    except (ValueError, IndexError) as exc:
        raise CostModelError(f"profile CSV {path}: column {name!r} is not numeric: {exc}") from exc


def _op_medians(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
    """Sorted token grid, per-op median ms on it (repeats averaged), and the shape columns."""
    header, body = _read_rows(path)
    ops = [c[len(_MEDIAN_PREFIX) : -len(_MEDIAN_SUFFIX)] for c in header
           if c.startswith(_MEDIAN_PREFIX) and c.endswith(_MEDIAN_SUFFIX)]  # fmt: skip
    if not ops:
        raise CostModelError(f"profile CSV {path} has no time_stats.<op>.median columns")
    tokens = _column(path, header, body, "num_tokens")
    if (tokens < 1).any():
        raise CostModelError(f"profile CSV {path}: num_tokens must be >= 1")
    grid, inverse = np.unique(tokens, return_inverse=True)
    repeats = np.bincount(inverse)
    medians = {}
    for op in ops:
        ms = _column(path, header, body, f"{_MEDIAN_PREFIX}{op}{_MEDIAN_SUFFIX}")
        if not (np.isfinite(ms) & (ms >= 0)).all():
            raise CostModelError(f"profile CSV {path}: {op} median holds a negative or NaN time")
        medians[op] = np.bincount(inverse, weights=ms) / repeats
    shape = {c: float(_column(path, header, body, c)[0]) for c in _SHAPE_COLUMNS if c in header}
    return grid, medians, shape


def _preset_of_shape(shape: dict[str, float]) -> ModelShape | None:
    """The preset whose width matches the profiled layer, if one does."""
    for preset in MODEL_PRESETS.values():
        dims = (preset.hidden_size, preset.intermediate_size, preset.num_heads, preset.num_kv_heads)
        if tuple(shape.get(c) for c in _SHAPE_COLUMNS) == dims:
            return preset
    return None


def _interp_ms(x: np.ndarray, grid: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """Linear between profiled points; no kernel runs for 0 tokens; past the last point the
    time grows in proportion (large GEMMs are compute-bound, time linear in tokens)."""
    y = np.interp(x, grid, curve)
    above = x > grid[-1]
    y[above] = curve[-1] * x[above] / grid[-1]
    return np.where(x > 0, y, 0.0)


@dataclass(frozen=True, eq=False)
class ProfileCostModel:
    """Step time = overhead_s + Σ_layers [layer_ops(t_ℓ) + context_ops(c_ℓ) + fill_ops(k_ℓ)]
    + step_ops(tokens fed), each op the interpolated profiled median (ms → s)."""

    source: str  # the CSV it was read from
    num_tokens: np.ndarray = field(repr=False)  # [points] ascending profiled token counts
    layer_ms: np.ndarray = field(repr=False)  # [points] per-layer operators, summed
    fill_ms: np.ndarray = field(repr=False)  # [points] what a K/V-only token runs
    step_ms: np.ndarray = field(repr=False)  # [points] once-per-step operators
    context_ms: np.ndarray = field(repr=False)  # [points] attention against context; 0 if absent
    num_layers: int | None = None  # target depth; None = the trace's own depth
    max_context_tokens: int | None = None  # the profiled model's context, when known
    overhead_s: float = 0.0
    name: str = field(default="profile", init=False)
    # memo of relative-depth matrices by trace depth; not part of the model's value
    _spread_cache: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_csv(
        cls,
        path: str | Path,
        *,
        num_layers: int | None = None,
        overhead_s: float = 0.0,
        max_context_tokens: int | None = None,
    ) -> ProfileCostModel:
        """Without num_layers the depth of a preset of the profiled width is used, else the
        trace's own depth (each trace layer priced as one profiled layer)."""
        path = Path(path)
        grid, medians, shape = _op_medians(path)
        matched = _preset_of_shape(shape)
        if num_layers is None and matched is not None:
            num_layers = matched.num_layers
        if max_context_tokens is None and matched is not None:
            max_context_tokens = matched.max_context_tokens
        if num_layers is not None and num_layers < 1:
            raise CostModelError(f"profile cost model: num_layers must be >= 1, got {num_layers}")
        if not overhead_s >= 0:
            raise CostModelError(f"profile cost model: overhead_s must be >= 0, got {overhead_s}")
        zero = np.zeros_like(grid)
        per_layer = [op for op in medians if op not in STEP_OPS | CONTEXT_OPS]
        if not CONTEXT_OPS & medians.keys():
            log.info("%s has no attention kernels: attention over the context is not charged", path)
        return cls(
            source=str(path), num_tokens=grid,
            layer_ms=sum((medians[op] for op in per_layer), zero),
            fill_ms=sum((medians[op] for op in FILL_OPS & medians.keys()), zero),
            step_ms=sum((medians[op] for op in STEP_OPS & medians.keys()), zero),
            context_ms=sum((medians[op] for op in CONTEXT_OPS & medians.keys()), zero),
            num_layers=num_layers, overhead_s=overhead_s, max_context_tokens=max_context_tokens,
        )  # fmt: skip

    def _spread_matrix(self, num_source: int) -> np.ndarray:
        """[L_src, L_tgt]: spread_layers is linear, so one matrix maps every row of counts."""
        if num_source not in self._spread_cache:
            unit_counts = np.eye(num_source)  # row i: one count in source layer i
            self._spread_cache[num_source] = spread_layers(unit_counts, self.num_layers)
        return self._spread_cache[num_source]

    def step_time_s(self, f: StepFeatures) -> float:
        per_layer = (f.layer_tokens, f.layer_context_tokens, f.layer_kv_only_tokens)
        if not per_layer[0] or len({len(x) for x in per_layer}) != 1:
            raise CostModelError("step features: per-layer tuples empty or of unequal length")
        work = np.array(per_layer, dtype=np.float64)  # [3, L_src]
        if self.num_layers is not None and work.shape[1] != self.num_layers:
            work = work @ self._spread_matrix(work.shape[1])  # [3, L_tgt]
        tokens, context, kv_only = work
        grid = self.num_tokens
        ms = _interp_ms(tokens, grid, self.layer_ms).sum()
        ms += _interp_ms(np.where(tokens > 0, context, 0.0), grid, self.context_ms).sum()
        ms += _interp_ms(kv_only, grid, self.fill_ms).sum()
        fed = np.array([f.num_prefill_tokens + f.num_decode_rows], dtype=np.float64)
        ms += _interp_ms(fed, grid, self.step_ms).sum()
        return self.overhead_s + float(ms) * 1e-3
