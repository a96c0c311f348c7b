"""What every bench suite is given: the parsed options, a line printer and a progress line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Say = Callable[[str], None]  # one finished line of output (the verb prints it at once)
Progress = Callable[[str, int, int, str], None]  # (phase, done, total, note)


@dataclass(frozen=True)
class BenchOptions:
    out: Path  # the folder for run.json and the suite's JSON
    model: str = "builtin"
    data_dir: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    num_requests: int | None = None  # None: the suite's own default
    max_new_tokens: int | None = None
    dataset: str = "cnndm"  # early-exit: cnndm | xsum
    rules: str = "hidden,softmax,classifier"  # early-exit
    batchings: str | None = None  # early-exit: None, every batching of the grid
    points: str | None = None  # early-exit: RULE:λ:FIRST_LAYER,... instead of the rules' points
    fills: str = "copy"  # early-exit
    rule: str | None = None  # vllm
    threshold: float | None = None  # vllm
    min_exit_layer: int | None = None  # vllm; capture: the sparse oracle's first exit point
    exit_stride: int | None = None  # capture: the sparse oracle's exit stride (default 3)
    trace: str = "traces/samples/oracle_cnndm"  # sim-speed
    sizes: str = "1000,19366,100000"  # sim-speed: numbers of Azure requests
    workloads: str | None = None  # validation: None, all of them
    eos: str = "stop"  # validation: "ignore" runs every request to its output length
    workload: str | None = None  # noise: None, the demo's
    rounds: int = 5  # noise: interleaved rounds of every variant
