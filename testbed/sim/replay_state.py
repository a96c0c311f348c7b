"""What the replay runner keeps per sequence: its trace stream, read once into plain lists at
admission, and the K/V positions it still owes to deep layers (lazy and recompute fills)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.fast_path import confident_layers
from testbed.core.policy_set import PolicySet
from testbed.sim.token_source import TokenStream


@dataclass
class Deferred:
    """A position whose K/V some deep layers still lack."""

    position: int
    layer: int  # layers 0..layer-1 hold its K/V


@dataclass(frozen=True)
class SeqReplay:
    """One admitted sequence's replay data; output position p reads index min(p, len - 1) of its
    lists (positions past a trace stream's end reuse its last token). The lists hold at least
    max_tokens entries (padded with their last), so p < max_tokens may index them directly."""

    stream: TokenStream  # the general path reads its signals per exit point
    tokens: list[int]  # [n] emitted token per trace index
    # per output position (per trace index when λ is constant): first exit layer where the run's
    # rule is confident, num_layers where it never is; None when the policy reads no signals
    # or the fast path is off
    confident: list[int] | None
    num_prompt_tokens: int
    max_tokens: int

    def token_at(self, out_pos: int) -> int:
        return self.tokens[min(out_pos, len(self.tokens) - 1)]


class SeqReplayFactory:
    """Builds SeqReplay records, sharing the work between requests that borrow one stream: its
    token list always, and its confident layers when λ does not depend on the output length."""

    def __init__(self, policies: PolicySet, num_layers: int, *, with_confident: bool) -> None:
        self.policies, self.num_layers = policies, num_layers
        # only the fast path reads confident layers, and only a policy that reads signals
        self.with_confident = with_confident and policies.batching.needs_signals
        self.exit_layers = policies.exit_points.layers(num_layers)
        # keyed by id(stream): the streams live as long as the TraceTokens that owns them
        self._tokens: dict[int, list[int]] = {}
        self._confident: dict[tuple[int, int | None], list[int]] = {}

    def build(self, stream: TokenStream, num_prompt_tokens: int, max_tokens: int) -> SeqReplay:
        key = id(stream)
        if key not in self._tokens:
            self._tokens[key] = stream.token_ids.tolist()
        confident = None
        if self.with_confident and max_tokens > 0:
            is_const = self.policies.exit_rule.decay_tau is None
            ckey = (key, None if is_const else max_tokens)
            if ckey not in self._confident:
                self._confident[ckey] = self._confident_layers(stream, max_tokens)
            confident = self._confident[ckey]
        _pad(self._tokens[key], max_tokens)
        if confident is not None:
            _pad(confident, max_tokens)
        return SeqReplay(stream, self._tokens[key], confident, num_prompt_tokens, max_tokens)

    def _confident_layers(self, stream: TokenStream, max_tokens: int) -> list[int]:
        # A constant λ makes the list depend on the stream only (one entry per trace index); a
        # decaying λ(t) depends on the position and the output limit: one entry per position.
        rule = self.policies.exit_rule
        num_positions = max_tokens if rule.decay_tau is not None else len(stream)
        positions = np.arange(num_positions)
        values = stream.signals[rule.signal][np.minimum(positions, len(stream) - 1)]
        return confident_layers(
            rule, values, exit_layers=self.exit_layers, num_layers=self.num_layers,
            positions=positions, max_tokens=max_tokens,
        )  # fmt: skip


def _pad(values: list[int], length: int) -> None:
    """Extend a shared per-index list to ``length`` with its last entry, in place: the value
    every index past its end reads anyway, so a steady step can index it without clamping."""
    if values and len(values) < length:
        values.extend([values[-1]] * (length - len(values)))
