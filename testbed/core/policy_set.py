"""The policies one run uses, built from a frozen config through the registry.

Shared by the native engine, the simulator's replay runner and the vLLM backend, so all three
decide with the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from policies import BatchingPolicy, ExitPoints, KvFillPolicy, ThresholdRule, create


@dataclass(frozen=True)
class PolicyConfig:
    batching: str = "full"  # registry key: full, consensus, quorum, shrink, rebatch, skipdecode
    batching_params: tuple[tuple[str, Any], ...] = ()  # e.g. (("fraction", 0.75),)
    exit_rule: str = "hidden"  # softmax, hidden or classifier
    threshold: float = 0.9  # λ of the exit rule
    decay_tau: float | None = None  # CALM's position-decaying threshold; None: constant λ
    min_exit_layer: int = 1
    exit_stride: int = 1
    kv_fill: str = "copy"  # copy, lazy, recompute, skip
    kv_fill_params: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        # a config that exists is one the registry can build: unknown names and bad values
        # fail where the config is made, not in the run (or the sweep point) that uses it
        build_policies(self)

    @property
    def is_early_exit(self) -> bool:
        return build_policies(self).batching.is_early_exit

    def label(self) -> str:
        """Short name for tables: 'consensus/hidden@0.95≥4/copy'."""
        params = ",".join(f"{k}={v}" for k, v in self.batching_params)
        batching = f"{self.batching}({params})" if params else self.batching
        if self.batching == "full":
            return "full"
        layers = f"≥{self.min_exit_layer}" if self.min_exit_layer > 1 else ""
        stride = f"/{self.exit_stride}" if self.exit_stride > 1 else ""
        return f"{batching}/{self.exit_rule}@{self.threshold:g}{layers}{stride}/{self.kv_fill}"


@dataclass(frozen=True)
class PolicySet:
    batching: BatchingPolicy
    exit_rule: ThresholdRule
    exit_points: ExitPoints
    kv_fill: KvFillPolicy


def build_policies(cfg: PolicyConfig, *, num_layers: int | None = None) -> PolicySet:
    """Instantiate through the registry; unknown names and bad values raise PolicyConfigError,
    and so do exit points beyond the model when its depth ``num_layers`` is given."""
    rule = create("exit_rule", cfg.exit_rule, threshold=cfg.threshold, decay_tau=cfg.decay_tau)
    policies = PolicySet(
        batching=create("batching", cfg.batching, **dict(cfg.batching_params)),
        exit_rule=rule,
        exit_points=ExitPoints(min_exit_layer=cfg.min_exit_layer, stride=cfg.exit_stride),
        kv_fill=create("kv_fill", cfg.kv_fill, **dict(cfg.kv_fill_params)),
    )
    if num_layers is not None and policies.batching.is_early_exit:
        policies.exit_points.check_depth(num_layers)
    return policies
