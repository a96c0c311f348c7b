"""What a capture is asked to run and what it returns, for every engine (native and vLLM).

Torch-free, so the vLLM backend and the validation loop name these records without importing
the native engine. The native engine reads all of ``EngineConfig``; vLLM reads its policy,
scheduler and seed (its own K/V sizing and device are vLLM's).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from policies.exit_rules import ExitPoints
from testbed.core import SchedulerConfig
from testbed.core.policy_set import PolicyConfig
from testbed.errors import ConfigError

CAPTURE_MODES = ("oracle", "live")  # oracle: full depth, every signal; live: what the policy did
# bytes per element of each dtype name (testbed.engine.device.DTYPES's keys)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_NAMES = tuple(DTYPE_BYTES)
AUTO_DEVICE = "auto"  # CUDA when the engine's torch sees a GPU, else the CPU


def num_kv_blocks(kv_cache_mb: float, *, block_size: int, dtype: str, num_layers: int,
                  num_kv_heads: int, head_dim: int) -> int:  # fmt: skip
    """The K/V blocks ``kv_cache_mb`` holds for a model of that shape: the native engine's own
    count, which a simulation of the engine must use too (it sets how many sequences run at
    once). Torch-free, so the simulator reads it off a capture's meta."""
    bytes_per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * DTYPE_BYTES[dtype]
    return int(kv_cache_mb * 2**20 // bytes_per_block)


def oracle_policy(policy: PolicyConfig) -> PolicyConfig:
    """What an oracle capture runs: full depth, keeping the exit points it records."""
    return PolicyConfig(min_exit_layer=policy.min_exit_layer, exit_stride=policy.exit_stride)


def covering_oracle(policies: Iterable[PolicyConfig]) -> PolicyConfig:
    """The oracle of the fewest exit points (of the min_exit_layer + k·exit_stride form) that
    hold every early-exit policy's points, so one cheap capture replays them all."""
    early = [p for p in policies if p.is_early_exit]
    if not early:
        return PolicyConfig()
    first = min(p.min_exit_layer for p in early)
    stride = math.gcd(*(p.exit_stride for p in early), *(p.min_exit_layer - first for p in early))
    return PolicyConfig(min_exit_layer=first, exit_stride=stride)


def oracle_layers(policy: PolicyConfig, num_layers: int) -> tuple[int, ...]:
    """The layers an oracle records signals at: the policy's exit points (min_exit_layer, then
    every exit_stride layers; by default every layer) and the last layer. A replay of it can
    exit only at those points; fewer make the capture cheaper (each costs an LM head)."""
    points = ExitPoints(min_exit_layer=policy.min_exit_layer, stride=policy.exit_stride)
    points.check_depth(num_layers)
    return (*points.layers(num_layers), num_layers)


@dataclass(frozen=True)
class EngineConfig:
    policy: PolicyConfig = PolicyConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    block_size: int = 16
    kv_cache_mb: float = 256.0  # K/V memory for all layers; sets the number of blocks
    seed: int = 0
    device: str = AUTO_DEVICE  # auto, cpu, cuda, cuda:N
    dtype: str = "float32"  # weights, K/V and activations: one of DTYPE_NAMES

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.kv_cache_mb <= 0:
            raise ConfigError("block_size and kv_cache_mb must be positive")
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"dtype {self.dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")

    def num_kv_blocks(self, *, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
        """The K/V blocks this engine holds for a model of that shape (see num_kv_blocks)."""
        return num_kv_blocks(self.kv_cache_mb, block_size=self.block_size, dtype=self.dtype,
                             num_layers=num_layers, num_kv_heads=num_kv_heads,
                             head_dim=head_dim)  # fmt: skip


@dataclass(frozen=True)
class CaptureConfig:
    mode: str = "oracle"  # one of CAPTURE_MODES
    engine: EngineConfig = EngineConfig()
    profile_layers: bool = False  # per-layer timings in steps.parquet
    workload: str = ""  # the workload description, recorded in meta.json
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in CAPTURE_MODES:
            known = ", ".join(CAPTURE_MODES)
            raise ConfigError(f"unknown capture mode {self.mode!r} (known: {known})")

    def recorded_layers(self, num_layers: int) -> list[int] | None:
        """Where an oracle records signals (meta.json's ``oracle_layers``: a replay's exit
        points must be among them); None for a live capture."""
        if self.mode != "oracle":
            return None
        return list(oracle_layers(self.engine.policy, num_layers))


@dataclass(frozen=True)
class CaptureRequest:
    request_id: int
    arrival_s: float
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    source_index: int | None = None  # the data set item the prompt was cut from (references)
    ignore_eos: bool = False  # run to max_tokens past an end-of-sequence token (workload eos=)


@dataclass
class RequestOutput:
    seq_id: int
    prompt_token_ids: tuple[int, ...]
    token_ids: list[int]  # generated tokens
    exit_layers: list[int]  # layer count at which each token was taken
    text: str | None = None
    arrival_s: float = 0.0
    first_token_s: float | None = None  # on the run's clock
    finish_s: float | None = None
    num_preemptions: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def latency_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.finish_s is None or self.first_token_s is None or len(self.token_ids) < 2:
            return None
        return (self.finish_s - self.first_token_s) / (len(self.token_ids) - 1)


def matches_final(argmax: list[int | None] | None, token_id: int) -> list[bool | None] | None:
    """The ``matches_final`` cell of an oracle token: whether each layer's argmax is the emitted
    token; None at the layers the oracle did not record, and for a live token."""
    if argmax is None:
        return None
    return [None if a is None else a == token_id for a in argmax]
