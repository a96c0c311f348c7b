"""Token choice from exit-head logits: greedy by default, seeded temperature / top-p otherwise.

Each sequence draws from its own generator seeded by (run seed, seq id), so a sequence's tokens
do not depend on which other sequences shared its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from testbed.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64  # most output tokens
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass kept when sampling
    ignore_eos: bool = False  # True: run to max_tokens (benchmarks)

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ConfigError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must lie in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generators: dict[int, torch.Generator] = {}

    def release(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    def _generator(self, seq_id: int) -> torch.Generator:
        if seq_id not in self._generators:
            self._generators[seq_id] = torch.Generator().manual_seed(self.seed * 1_000_003 + seq_id)
        return self._generators[seq_id]

    def sample(
        self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams]
    ) -> list[int]:
        """logits [rows, vocab] -> one token per row."""
        tokens = logits.argmax(-1).tolist()
        for i, (seq_id, p) in enumerate(zip(seq_ids, params, strict=True)):
            if not p.is_greedy:
                tokens[i] = self._draw(logits[i], p, self._generator(seq_id))
        return tokens

    @staticmethod
    def _draw(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
        # on the CPU: the sequence's generator is a CPU one, so a draw does not depend on device
        probs = (logits.float().cpu() / p.temperature).softmax(-1)
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = sorted_probs.cumsum(-1) - sorted_probs < p.top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=gen)
        return int(order[choice])
