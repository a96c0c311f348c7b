"""Per-request token streams of a trace: the tokens a simulated request emits, the recorded exit
signals of each, and whether each layer's argmax matched the final token (oracle flags)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.exit_rules import ExitPoints, ExitSignals
from testbed.sim.errors import SimulationError
from testbed.trace import SIGNAL_COLUMNS, Capture, signal_matrix


@dataclass(frozen=True)
class TokenStream:
    token_ids: np.ndarray  # [n] int
    signals: dict[str, np.ndarray]  # signal name -> [n, L] float, NaN where not recorded
    matches_final: np.ndarray  # [n, L] float 1/0, NaN where not recorded

    def __len__(self) -> int:
        return len(self.token_ids)

    def exit_signals(self, positions: np.ndarray, layer: int) -> ExitSignals:
        idx = np.minimum(positions, len(self) - 1)  # cycled streams clamp, see TraceTokens.stream
        return ExitSignals(**{name: m[idx, layer - 1] for name, m in self.signals.items()})


def check_exit_points(capture: Capture, points: ExitPoints) -> None:
    """Refuse exit points an oracle capture recorded no signals at: a replay there would read
    NaN and silently never exit. A live capture replays its own rule and is not checked."""
    recorded = capture.oracle_layers
    if recorded is None:
        return
    missing = sorted(set(points.layers(capture.num_layers)) - set(recorded))
    if missing:
        raise SimulationError(
            f"{capture.path}: the oracle recorded exit signals only at layers "
            f"{_layer_list(recorded[:-1])}, not at {_layer_list(missing)}; choose exit points "
            "among those, or capture an oracle whose exit points (--min-exit-layer, "
            "--exit-stride) cover them"
        )


def _layer_list(layers) -> str:
    if len(layers) <= 8:
        return ", ".join(map(str, layers))
    return f"{layers[0]}, {layers[1]}, ..., {layers[-1]}"


class TraceTokens:
    """Streams by request id, plus seeded sampling by output length for other workloads."""

    def __init__(self, capture: Capture) -> None:
        if capture.tokens.num_rows == 0:
            raise SimulationError(f"{capture.path}: the trace has no tokens")
        L = capture.num_layers
        self.num_layers = L
        tokens = capture.tokens
        rid = tokens["request_id"].to_numpy()
        order = np.lexsort((tokens["position"].to_numpy(), rid))
        ids = tokens["token_id"].to_numpy()[order]
        sig = {name: signal_matrix(tokens, name, L)[order] for name in SIGNAL_COLUMNS}
        flags = signal_matrix(tokens, "matches_final", L)[order]
        bounds = np.flatnonzero(np.r_[True, rid[order][1:] != rid[order][:-1], True])
        self.streams: dict[int, TokenStream] = {}
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            self.streams[int(rid[order][a])] = TokenStream(
                ids[a:b], {k: v[a:b] for k, v in sig.items()}, flags[a:b]
            )
        self.available = {k for k, m in sig.items() if not np.isnan(m).all()}
        # memo of the candidate ids per requested length: the same list, in the same order,
        # that a fresh scan finds, so the seeded draw does not change
        self._long_enough: dict[int, list[int]] = {}
        self._longest = max(self.streams.values(), key=len)  # the first of the longest

    def check_signal(self, signal: str) -> None:
        if signal not in self.available:
            raise SimulationError(
                f"the trace records no {signal!r} signal (it has: {', '.join(sorted(self.available)) or 'none'})"
            )

    def for_request(
        self, request_id: int, num_tokens: int, rng: np.random.Generator
    ) -> TokenStream:
        """The trace's own stream when the id is in the trace (the same workload); else one
        sampled among those at least ``num_tokens`` long, seeded."""
        own = self.streams.get(request_id)
        if own is not None:
            return own
        if num_tokens not in self._long_enough:
            self._long_enough[num_tokens] = [
                k for k, s in self.streams.items() if len(s) >= num_tokens
            ]
        long_enough = self._long_enough[num_tokens]
        if long_enough:
            return self.streams[long_enough[int(rng.integers(len(long_enough)))]]
        return self._longest  # positions past its end reuse its last token
