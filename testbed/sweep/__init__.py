"""Sweeps: a grid of policies × rules × λ × workloads × cost models, run on any Executor.

GRID.toml (paths are relative to the working directory of the sweep and of its workers):

    trace = "traces/samples/oracle_cnndm"      # capture directory to replay
    workloads = ["poisson:rate=2,n=200,prompt=64-384,output=64"]   # one or more
    cost_models = ["roofline:H100", "fitted:traces/samples/oracle_cnndm"]
    seed = 0                                    # optional (0)
    block_size = 16                             # optional, as SimulationConfig
    num_kv_blocks = 4096                        # optional (default: a fit, the engine's own)

    [[policies]]                 # one or more; each expands over rules × thresholds
    batching = "consensus"       # registry name
    batching_params = {}         # optional, e.g. {fraction = 0.75}
    rules = ["hidden", "softmax"]
    thresholds = [0.9, 0.95]
    min_exit_layer = 1           # optional; also exit_stride (1), kv_fill ("copy"), decay_tau

    [constraint]                 # optional
    min_agreement = 0.9          # the ranking keeps runs with est_agreement >= this

    [scheduler]                  # optional SchedulerConfig fields
    max_num_seqs = 64

Every workload × cost model also runs the `full` policy, the baseline that speedups refer to.
Each finished run is written at once to OUT/runs/<key>.json (key: a hash of the run's config), so an
interrupted sweep resumes where it stopped; a failed run leaves OUT/runs/<key>.error.json and the
sweep goes on. OUT/results.parquet then holds one row per finished run: config columns and metrics.

grid (GRID.toml) -> run (the executor, one file per run) -> results (rows, ranking).
"""

from testbed.sweep.grid import BASELINE_POLICY, Grid, GridError, PolicyGrid, load_grid, parse_grid
from testbed.sweep.results import config_columns, policy_of, rank_runs
from testbed.sweep.run import SweepReport, open_executor, run_key, run_sweep

__all__ = [
    "BASELINE_POLICY",
    "Grid",
    "GridError",
    "PolicyGrid",
    "SweepReport",
    "config_columns",
    "load_grid",
    "open_executor",
    "parse_grid",
    "policy_of",
    "rank_runs",
    "run_key",
    "run_sweep",
]
