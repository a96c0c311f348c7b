"""A/B validation: run chosen policies on a real engine and the simulator, compare the two.

For each configuration (the `full` baseline first) the engine runs the workload arrival-paced
as a live capture; the simulator replays the workload's oracle trace with a cost model fitted on
a *separate* calibration run. The result folder holds, per configuration, the measured and the
predicted metrics, quality (ROUGE-L, agreement with `full`'s output) and the replay error (how
the exit layers the simulator derived from the oracle trace differ from what the live run did),
plus a table of errors and the Kendall tau of the two throughput orders.

A shared machine's speed wanders by tens of percent between runs. A short fixed probe
(speed_probe) is timed three times right before and three times right after every calibration
and measured run. The fit normalises each calibration run to the calibration's median probe
time (the reference speed); the prediction is made at that speed. Beside it, each measured run
is also predicted at its own probe time
(``F*fitted:...``, "probed"); the run's own timings never enter either prediction.

A third prediction is made in hindsight: each measured run at the speed its own steps ran
(their seconds over the fit's price of them, known only after the run). It is no forecast, but
it splits an error in two: what remains at the run's own speed is the simulator's (replay,
scheduling, queue); the rest is the machine's speed that neither the reference nor the probes
knew.

OUT/
  run.json               config, seed, git commit
  calibration/           captures the cost model is fitted on (when made here)
  oracle/                the oracle trace the simulator replays (when captured here)
  live/NN/rK             the live capture of configuration NN in round K
  live/NN/rK.speed.json  the speed probes' seconds right before and after that run
  configs/NN.json        one finished configuration (written as soon as it finishes)
  configs/NN.error.json  a configuration that failed; the others go on
  validation.json        everything above, summarised; validation.parquet the error table
  latencies.parquet      per request and source (measured/simulated): TTFT, TPOT, end-to-end
"""

from testbed.validate.config import (
    BASELINE,
    ENGINES,
    ProgressFn,
    ValidationConfig,
    ValidationError,
    ValidationResult,
)
from testbed.validate.orchestrate import calibrate, oracle_trace, run_validation
from testbed.validate.runs import EngineRuns
from testbed.validate.selection import Selection, select_from_sweep
from testbed.validation_records import VALIDATION_SCHEMA_VERSION, ValidationResults

__all__ = [
    "BASELINE",
    "ENGINES",
    "VALIDATION_SCHEMA_VERSION",
    "EngineRuns",
    "ProgressFn",
    "Selection",
    "ValidationConfig",
    "ValidationError",
    "ValidationResult",
    "ValidationResults",
    "calibrate",
    "oracle_trace",
    "run_validation",
    "select_from_sweep",
]
