"""Exit rules: turn the confidence signals at an exit point into a per-row `confident` mask.

An exit point `layer` is an int in 1..num_layers meaning "after `layer` decoder layers have run".
Rules only compare a signal with a threshold λ; computing the signals is the runner's job (the
engine computes them from the model, the simulator reads them from a trace).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from policies.errors import PolicyConfigError

# CALM (Schuster et al. 2022) blends λ with a term decaying over the output: 0.9·λ + 0.1·e^(−τt/N).
_CALM_KEEP = 0.9
_CALM_DECAY = 0.1


@dataclass(frozen=True)
class ExitSignals:
    """Confidence signals of the rows at one exit point; a signal the runner skipped is None."""

    softmax_margin: np.ndarray | None = None  # float [rows]: top-1 minus top-2 probability
    hidden_cosine: np.ndarray | None = None  # float [rows]: cos(hidden at layer, at layer - 1)
    classifier_prob: np.ndarray | None = None  # float [rows]: exit classifier's P(token is final)


@dataclass(frozen=True)
class ExitPoints:
    """The layers at which rows may exit: min_exit_layer, then every `stride` layers."""

    min_exit_layer: int = 1  # shallowest exit point (layers run before the first check)
    stride: int = 1  # layers between consecutive exit points

    def __post_init__(self) -> None:
        if self.min_exit_layer < 1:
            raise PolicyConfigError(f"exit points: min_exit_layer must be >= 1, got {self}")
        if self.stride < 1:
            raise PolicyConfigError(f"exit points: stride must be >= 1, got {self}")

    def check_depth(self, num_layers: int) -> None:
        """Refuse points that a model of this depth never reaches (the last layer is no exit)."""
        if self.min_exit_layer >= num_layers:
            raise PolicyConfigError(
                f"min exit layer {self.min_exit_layer} leaves no exit point in a model of "
                f"{num_layers} layers (exit points are layers 1..{num_layers - 1})"
            )

    def is_exit_point(self, layer: int, num_layers: int) -> bool:
        # The final layer is not an exit point: there every remaining row takes its token anyway.
        offset = layer - self.min_exit_layer
        return offset >= 0 and offset % self.stride == 0 and layer < num_layers

    def layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(range(self.min_exit_layer, num_layers, self.stride))


@dataclass(frozen=True)
class ThresholdRule:
    """A row is confident when its signal is >= λ(t); subclasses pick the signal and λ's range."""

    threshold: float  # λ at the start of the output (and everywhere when decay_tau is None)
    decay_tau: float | None = None  # CALM's decay rate τ >= 0; None keeps λ constant

    name: ClassVar[str]  # registry, config and CLI key
    signal: ClassVar[str]  # the ExitSignals field this rule reads
    kind: ClassVar[str] = "exit_rule"
    threshold_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def __post_init__(self) -> None:
        low, high = self.threshold_range
        # Written so that NaN fails too.
        if not low <= self.threshold <= high:
            raise PolicyConfigError(
                f"exit rule '{self.name}': threshold {self.threshold} is outside "
                f"[{low:g}, {high:g}]"
            )
        if self.decay_tau is not None and not (
            math.isfinite(self.decay_tau) and self.decay_tau >= 0
        ):
            raise PolicyConfigError(
                f"exit rule '{self.name}': decay_tau must be a finite number >= 0 or None, "
                f"got {self.decay_tau}"
            )

    def threshold_at(self, positions: np.ndarray, max_tokens: np.ndarray) -> np.ndarray:
        """λ per row: float [rows]; positions are 0-based output indices, max_tokens is N per row.

        With decay, λ(t) = clip(0.9·λ + 0.1·exp(−τ·t/N)): early tokens need more confidence than
        late ones, because an early mistake conditions everything generated after it (CALM).
        The clip is to the rule's threshold range, which is [0, 1] except for `hidden`.
        """
        positions_f = np.asarray(positions, dtype=np.float64)
        if self.decay_tau is None:
            return np.full(positions_f.shape, float(self.threshold))
        max_tokens_f = np.asarray(max_tokens, dtype=np.float64)
        if np.any(max_tokens_f <= 0):
            raise ValueError(f"exit rule '{self.name}': max_tokens must be > 0 for every row")
        decayed = _CALM_KEEP * self.threshold + _CALM_DECAY * np.exp(
            -self.decay_tau * positions_f / max_tokens_f
        )
        return np.clip(decayed, *self.threshold_range)

    def confident(
        self, signals: ExitSignals, *, positions: np.ndarray, max_tokens: np.ndarray
    ) -> np.ndarray:
        """bool [rows]: signal >= λ(t). A NaN signal is never confident."""
        values = getattr(signals, self.signal)
        if values is None:
            raise PolicyConfigError(
                f"exit rule '{self.name}' needs signal '{self.signal}', which was not computed"
            )
        return np.asarray(values, dtype=np.float64) >= self.threshold_at(positions, max_tokens)


@dataclass(frozen=True)
class SoftmaxMarginRule(ThresholdRule):
    """Top-1 minus top-2 probability of the exit head (needs the LM head at the exit layer)."""

    name: ClassVar[str] = "softmax"
    signal: ClassVar[str] = "softmax_margin"


@dataclass(frozen=True)
class HiddenCosineRule(ThresholdRule):
    """Cosine similarity of consecutive hidden states: cheap, and the best rule in Miao et al."""

    name: ClassVar[str] = "hidden"
    signal: ClassVar[str] = "hidden_cosine"
    threshold_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)


@dataclass(frozen=True)
class ClassifierRule(ThresholdRule):
    """Probability from CALM's per-layer exit classifier that the exit token equals the final."""

    name: ClassVar[str] = "classifier"
    signal: ClassVar[str] = "classifier_prob"


EXIT_RULES: tuple[type[ThresholdRule], ...] = (SoftmaxMarginRule, HiddenCosineRule, ClassifierRule)
