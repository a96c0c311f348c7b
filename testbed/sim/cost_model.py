"""Cost models turn what a simulated step did (StepFeatures) into seconds (DESIGN §7).

Three kinds, one ``step_time_s`` interface: ``fitted`` (non-negative least squares on a
capture's steps.parquet, here), ``roofline`` (a named GPU and model shape, roofline.py) and
``profile`` (Vidur per-operator CSVs, profile_cost.py). ``build_cost_model`` parses CLI specs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from testbed.cost_spec import CostModelSpec, FitSource
from testbed.errors import EetbError
from testbed.sim.cost_base import CostModel, CostModelError, StepFeatures, map_layers
from testbed.sim.hardware import MODEL_PRESETS, GpuSpec, ModelShape, gpu_spec
from testbed.sim.profile_cost import ProfileCostModel
from testbed.sim.roofline import RooflineCostModel
from testbed.trace import read_capture

__all__ = [
    "CostModel", "CostModelError", "FitReport", "FittedCostModel", "GpuSpec", "ModelShape",
    "ProfileCostModel", "RooflineCostModel", "ScaledCostModel", "StepFeatures",
    "build_cost_model", "context_tokens_of", "map_layers", "nnls", "price_capture_s",
]  # fmt: skip

log = logging.getLogger(__name__)

# term name → StepFeatures / steps.parquet column; "overhead" is the constant 1 per step
COUNT_TERMS: Mapping[str, str] = {
    "row_layers": "num_row_layers_executed",
    "kv_only_row_layers": "num_kv_only_row_layers",
    "prefill_tokens": "num_prefill_tokens",
    "context_tokens": "num_context_tokens",
    # layers any token ran: per-layer fixed costs (kernel launches, weight reads) are paid once
    # per layer run, however many rows run it
    "layers_run": "num_layers_run",
    # exit-rule work is a batched call per exit point plus a little per row (rule_evals_<rule>)
    "exit_points": "num_exit_points",
    # causal (query, key) pairs over layers: a prefill chunk of n tokens after c cached ones
    # scores n·c + n(n+1)/2 per layer, quadratic in n, which the linear token terms miss
    "attention_pairs": "num_attention_pairs",
    # one batched LM head + sampler call per layer at which any row took its token: `full` pays
    # one per step, a policy whose rows exit at five layers pays five
    "sampling_layers": "num_sampling_layers",
}
BASE_TERMS = ("overhead", *COUNT_TERMS)
RULE_PREFIX = "rule_evals_"  # one term per exit rule: rule_evals_softmax, rule_evals_hidden, ...


@dataclass(frozen=True)
class FitReport:
    coefficients: dict[str, float]  # seconds per unit of each term
    r2: float  # coefficient of determination of the fit on its own steps
    num_steps: int
    rmse_s: float  # root mean squared residual

    def table(self) -> str:
        lines = [f"{'term':<24}{'s per unit':>14}{'µs per unit':>14}"]
        lines += [f"{k:<24}{v:>14.4e}{v * 1e6:>14.3f}" for k, v in self.coefficients.items()]
        lines.append(
            f"R² = {self.r2:.4f}, RMSE = {self.rmse_s * 1e3:.3f} ms over {self.num_steps} steps"
        )
        return "\n".join(lines)


def _solve_passive(a: np.ndarray, b: np.ndarray, x: np.ndarray, passive: np.ndarray, tol: float):
    """Lawson–Hanson inner loop: least squares on the passive set, stepping back towards x
    and releasing variables until the solution is strictly positive there."""
    for _ in range(a.shape[1] + 1):  # each pass releases at least one variable
        z = np.zeros_like(x)
        z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
        if (z[passive] > tol).all():
            return z, passive
        blocking = passive & (z <= tol)
        gap = x[blocking] - z[blocking]  # x ≥ 0 ≥ z up to tol; gap ≤ 0 only when both are ~0
        alpha = np.min(np.where(gap > 0, x[blocking] / np.where(gap > 0, gap, 1), 0.0))
        x = x + alpha * (z - x)
        passive = passive & (x > tol)
        x[~passive] = 0.0
    return x, passive


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ‖a·x − b‖₂ subject to x ≥ 0 (Lawson & Hanson 1974, active-set method).
    numpy only: scipy is not a dependency of the simulator."""
    m, n = a.shape
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(np.float64).eps * np.linalg.norm(a, 1) * max(m, n)
    for _ in range(3 * n + 1):
        w = a.T @ (b - a @ x)  # [n] negative gradient; > 0 where raising x_j lowers the residual
        w[passive] = -np.inf
        j = int(np.argmax(w))
        if passive.all() or w[j] <= tol:
            break
        passive[j] = True
        x_new, passive = _solve_passive(a, b, x, passive, tol)
        if np.array_equal(x_new, x):  # j was released at once: optimal to working precision
            break
        x = x_new
    return x


def _fit(names: tuple[str, ...], x: np.ndarray, y: np.ndarray) -> tuple[FittedCostModel, FitReport]:
    """x [steps, terms], y [steps] seconds."""
    if x.shape[0] != len(y):
        raise CostModelError(f"fitted cost model: {x.shape[0]} steps but {len(y)} durations")
    if not (np.isfinite(x).all() and np.isfinite(y).all()) or (x < 0).any() or (y < 0).any():
        raise CostModelError("fitted cost model: step counts and durations must be finite and >= 0")
    if len(y) < len(names):
        raise CostModelError(
            f"fitted cost model: {len(names)} terms need at least {len(names)} steps, got {len(y)}"
        )
    if np.ptp(y) == 0:
        raise CostModelError("fitted cost model: every step took the same time, nothing to fit")
    norms = np.linalg.norm(x, axis=0)  # [terms]; scaling columns keeps the active set well-posed
    used = norms > 0  # a term that never occurred (no fill, no rule) stays 0
    coef = np.zeros(len(names))
    coef[used] = nnls(x[:, used] / norms[used], y) / norms[used]
    residual = y - x @ coef
    r2 = 1.0 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum())
    report = FitReport(
        coefficients=dict(zip(names, coef.tolist(), strict=True)), r2=r2, num_steps=len(y),
        rmse_s=float(np.sqrt(np.mean(residual**2))),
    )  # fmt: skip
    return FittedCostModel(names, tuple(coef.tolist()), report=report), report


def _value(row: Any, key: str, default: Any = None) -> Any:
    value = row.get(key, default) if isinstance(row, Mapping) else getattr(row, key, default)
    if value is None:
        raise CostModelError(f"fitted cost model: a step lacks {key!r}")
    return value


def _design_from_rows(rows: Sequence[Any]) -> tuple[tuple[str, ...], np.ndarray]:
    rules = [str(_value(r, "rule", "none")) for r in rows]
    names_of_rules = sorted(set(rules) - {"none"})
    columns = [np.ones(len(rows))]
    columns += [np.array([float(_value(r, c)) for r in rows]) for c in COUNT_TERMS.values()]
    evals = np.array([float(_value(r, "num_rule_evals")) for r in rows])
    columns += [np.where(np.array(rules) == rule, evals, 0.0) for rule in names_of_rules]
    names = (*BASE_TERMS, *(RULE_PREFIX + rule for rule in names_of_rules))
    return names, np.stack(columns, axis=1).reshape(len(rows), len(names))


@dataclass(frozen=True)
class FittedCostModel:
    """Step time = Σ_terms coefficient·count: overhead (1 per step), row_layers, kv_only_row_layers,
    prefill_tokens, context_tokens, layers_run, exit_points, attention_pairs, sampling_layers and
    rule_evals_<rule>.
    Aggregate counts only; a rule the fit never saw costs nothing (check ``prices_rule`` before
    a run)."""

    term_names: tuple[str, ...]
    coefficients_s: tuple[float, ...]  # seconds per unit, same order, all >= 0
    report: FitReport | None = field(default=None, compare=False)  # set when made by a fit
    name: str = field(default="fitted", init=False)
    _base_s: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _rule_s: dict[str, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names, coef = tuple(self.term_names), tuple(float(c) for c in self.coefficients_s)
        if len(names) != len(coef) or len(set(names)) != len(names):
            raise CostModelError(
                "fitted cost model: term names must be unique, one per coefficient"
            )
        unknown = [n for n in names if n not in BASE_TERMS and not n.startswith(RULE_PREFIX)]
        if unknown:
            raise CostModelError(
                f"fitted cost model: unknown terms {unknown}; known: {BASE_TERMS}, {RULE_PREFIX}<rule>"
            )
        if not all(np.isfinite(c) and c >= 0 for c in coef):
            raise CostModelError(f"fitted cost model: coefficients must be finite and >= 0: {coef}")
        by_name = dict(zip(names, coef, strict=True))
        rule_s = {
            n.removeprefix(RULE_PREFIX): c for n, c in by_name.items() if n.startswith(RULE_PREFIX)
        }
        # frozen: store the inputs as tuples and precompute what every step looks up
        object.__setattr__(self, "term_names", names)
        object.__setattr__(self, "coefficients_s", coef)
        object.__setattr__(self, "_base_s", tuple(by_name.get(t, 0.0) for t in BASE_TERMS))
        object.__setattr__(self, "_rule_s", rule_s)

    def prices_rule(self, rule: str) -> bool:
        return rule in self._rule_s

    def step_time_s(self, f: StepFeatures) -> float:
        (overhead, row_layer, kv_only, prefill, context, layers_run, points, pairs,
         sampling) = self._base_s  # fmt: skip
        time_s = (overhead + row_layer * f.num_row_layers_executed + kv_only * f.num_kv_only_row_layers
                  + prefill * f.num_prefill_tokens + context * f.num_context_tokens
                  + layers_run * f.num_layers_run + points * f.num_exit_points
                  + pairs * f.num_attention_pairs + sampling * f.num_sampling_layers)  # fmt: skip
        if f.num_rule_evals:
            time_s += self._rule_s.get(f.rule, 0.0) * f.num_rule_evals
        return time_s

    @classmethod
    def fit(
        cls, rows: Sequence[Any], durations_s: Sequence[float]
    ) -> tuple[FittedCostModel, FitReport]:
        """rows: StepFeatures, objects with the same attribute names, or dicts (rule optional)."""
        names, x = _design_from_rows(rows)
        return _fit(names, x, np.asarray(durations_s, dtype=np.float64))

    @classmethod
    def from_steps_parquet(cls, path: str | Path) -> tuple[FittedCostModel, FitReport]:
        """Fit on one or more captures: ``DIR`` or ``DIR1+DIR2`` (capture directories or their
        steps.parquet), each optionally ``F*DIR`` (see from_sources)."""
        return cls.from_sources(CostModelSpec.parse(f"fitted:{path}").sources)

    @classmethod
    def from_sources(cls, sources: Sequence[FitSource]) -> tuple[FittedCostModel, FitReport]:
        """Fit on captures, each one's step durations x its time factor (a capture made while the
        machine ran 1/F of its reference speed). Each capture's rule is its exit rule, none if it
        ran ``full``. Combining an oracle capture (many rows, no rule) with a live one separates
        per-row layer cost from per-row rule cost, which one live capture alone confounds."""
        rows, durations = [], []
        for source in sources:
            part_rows, part_durations = _steps_of(Path(source.path))
            rows += part_rows
            durations += [d * source.time_factor for d in part_durations]
        model, report = cls.fit(rows, durations)
        # a validation fits on dozens of captures: name them when few, count them when many
        names = [s.path for s in sources]
        source = "+".join(names) if len(names) <= 3 else f"{len(names)} captures ({names[0]} ...)"
        # debug: every sweep point refits in its worker; the report and the CLIs state the fit
        log.debug(
            "fitted cost model on %s: R² %.3f over %d steps", source, report.r2, report.num_steps
        )
        return model, report


def price_capture_s(model: FittedCostModel, path: str | Path) -> tuple[float, float]:
    """Seconds ``model`` prices a capture's own recorded steps at, and seconds they took. Their
    ratio is how fast the machine ran that capture against the fit's reference speed, plus the
    fit's own error on those steps."""
    rows, durations = _steps_of(Path(path))
    if not rows:
        return 0.0, 0.0
    names, x = _design_from_rows(rows)  # [steps, terms]
    by_name = dict(zip(model.term_names, model.coefficients_s, strict=True))
    # a rule term the fit never saw costs nothing, as in step_time_s
    coefficients = np.array([by_name.get(name, 0.0) for name in names])
    return float((x @ coefficients).sum()), float(sum(durations))


def _steps_of(path: Path) -> tuple[list[dict[str, Any]], list[float]]:
    directory = path.parent if path.suffix == ".parquet" else path
    try:
        capture = read_capture(directory)
    except (EetbError, OSError) as exc:  # TraceError: say which cost model wanted it
        raise CostModelError(f"cannot fit a cost model on {path}: {exc}") from exc
    policy = capture.meta.get("policy") or {}
    rule = policy.get("exit_rule", "none") if policy.get("batching") != "full" else "none"
    columns = (*COUNT_TERMS.values(), "num_rule_evals")
    steps = capture.steps.select([*columns, "duration_s"]).to_pylist()
    rows = [{**{c: step[c] for c in columns}, "rule": rule} for step in steps]
    return rows, [step["duration_s"] for step in steps]


@dataclass(frozen=True)
class ScaledCostModel:
    """Another cost model's step times times a constant: the same work on a machine running
    at 1/factor of that model's speed (a shared machine's slow spell, a slower part)."""

    base: CostModel
    factor: float  # > 0; 1.25: every step takes 25% longer

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def max_context_tokens(self) -> int | None:
        return context_tokens_of(self.base)

    def step_time_s(self, f: StepFeatures) -> float:
        return self.factor * self.base.step_time_s(f)


def _shape(model: str, trace_meta: Mapping[str, Any] | None, spec: str) -> ModelShape:
    """MODEL: a preset name; omitted: the shape of the model the trace came from."""
    if model:
        return ModelShape.preset(model)
    if trace_meta is None:
        raise CostModelError(
            f"{spec!r} names no model and there is no trace to take one from; "
            f"use roofline:GPU:MODEL with MODEL one of {', '.join(MODEL_PRESETS)}"
        )
    return ModelShape.from_capture_meta(trace_meta)


def _build_profile(path: str, model: str) -> ProfileCostModel:
    if not model:
        return ProfileCostModel.from_csv(path)
    shape = ModelShape.preset(model)
    return ProfileCostModel.from_csv(
        path, num_layers=shape.num_layers, max_context_tokens=shape.max_context_tokens
    )


def context_tokens_of(cost: CostModel) -> int | None:
    """The longest request (prompt + output) the priced model serves, None when the cost model
    does not say (a fit prices the trace's own model, whose context the caller knows)."""
    return getattr(cost, "max_context_tokens", None)


def build_cost_model(
    spec: str | CostModelSpec, *, trace_meta: Mapping[str, Any] | None = None
) -> CostModel:
    """The cost model a spec names (CostModelSpec, or its text: ``fitted:PATH[+PATH]``,
    ``roofline:GPU[:MODEL]``, ``profile:CSV[:MODEL]``, each optionally ``F*SPEC``: step times
    x F). trace_meta (a capture's meta.json) gives the model shape when MODEL is omitted."""
    spec = CostModelSpec.parse(spec) if isinstance(spec, str) else spec
    if spec.time_factor != 1.0:
        return ScaledCostModel(build_cost_model(spec.unscaled(), trace_meta=trace_meta),
                               spec.time_factor)  # fmt: skip
    if spec.kind == "fitted":
        return FittedCostModel.from_sources(spec.sources)[0]
    if spec.kind == "profile":
        return _build_profile(spec.target, spec.model)
    return RooflineCostModel(gpu_spec(spec.target), _shape(spec.model, trace_meta, str(spec)))
