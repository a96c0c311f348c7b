"""Each token's exit layer under a rule, read off an oracle capture's signals: the per-token
answer that batching policies then coarsen (the check that a live capture did what its rule
says, and the ideal depth of a rule)."""

from __future__ import annotations

import numpy as np

from policies.exit_rules import ExitPoints, ThresholdRule
from testbed.sim.token_source import check_exit_points
from testbed.trace import Capture, signal_matrix


def replay_exit_layers(capture: Capture, rule: ThresholdRule, points: ExitPoints) -> np.ndarray:
    """Exit layer per token if every token left at its first confident exit point (``shrink``
    or ``consensus`` semantics for the token itself). Position 0 comes from the prefill and
    always runs full depth; a token never confident exits at the last layer."""
    check_exit_points(capture, points)
    L = capture.num_layers
    tokens = capture.tokens
    signal = signal_matrix(tokens, rule.signal, L)  # [tokens, L], NaN where not recorded
    positions = tokens["position"].to_numpy()
    limits = dict(zip(capture.requests["request_id"].to_pylist(),
                      capture.requests["max_tokens"].to_pylist(), strict=True))  # fmt: skip
    max_tokens = np.array([limits[r] for r in tokens["request_id"].to_pylist()])
    threshold = rule.threshold_at(positions, max_tokens)
    exits = np.full(len(positions), L, dtype=np.int64)
    for layer in points.layers(L):  # ascending: the first confident layer wins
        confident = (signal[:, layer - 1] >= threshold) & (exits == L) & (positions > 0)
        exits[confident] = layer
    return exits
