"""What a validation is asked to run, and its errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from testbed.core.policy_set import PolicyConfig
from testbed.errors import EetbError
from testbed.validation_records import ValidationResults

ENGINES = ("native", "vllm")
BASELINE = PolicyConfig()
PROBES_PER_SIDE = 3  # speed probes right before and right after each run (probe_time_s)
ProgressFn = Callable[[str, int, int, str], None]  # (phase, done, total, note)


class ValidationError(EetbError):
    """A validation cannot start: no configuration, no calibration, an unknown engine."""


@dataclass(frozen=True)
class ValidationConfig:
    policies: tuple[PolicyConfig, ...]  # to validate; `full` is run first whether listed or not
    workload: str  # arrival-paced on the engine, replayed by the simulator
    calibration: str = ""  # "DIR[+DIR...]": captures the fitted cost model learns from
    calibration_workload: str = ""  # or: capture calibration runs of this workload here
    trace: str = ""  # oracle capture of `workload` to replay; "": capture one here
    engine: str = "native"
    model: str = "builtin"
    dataset: str = "cnndm"  # prompt source (references for ROUGE-L when it has them)
    seed: int = 0
    data_dir: str | None = None
    # rounds of runs, round-robin over the configurations (calibration runs first in each): a
    # slow spell of a shared machine then spreads over every configuration; measured = median
    repeats: int = 3
    device: str = "auto"  # the native engine's (testbed.engine.device); vLLM picks its own
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValidationError(f"repeats must be >= 1, got {self.repeats}")
        if self.engine not in ENGINES:
            raise ValidationError(f"unknown engine {self.engine!r} (known: {', '.join(ENGINES)})")
        if not self.policies:
            raise ValidationError("no configuration to validate (an empty ranking?)")
        if not (self.calibration or self.calibration_workload):
            raise ValidationError(
                "validation needs a calibration run for the cost model: give --calibration "
                "DIR[+DIR] (captures of another run) or --calibrate WORKLOAD"
            )

    @property
    def configurations(self) -> tuple[PolicyConfig, ...]:
        rest = [p for p in self.policies if p != BASELINE]
        return (BASELINE, *dict.fromkeys(rest))


@dataclass(frozen=True)
class ValidationResult:
    out: Path
    results: ValidationResults  # validation.json
