"""``--suite sim-speed``: the simulator's wall time on the Azure conversation hour and beyond."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from testbed.bench.options import BenchOptions, Say
from testbed.core.policy_set import PolicyConfig
from testbed.runinfo import write_run_info
from testbed.sim.simulator import SimulationConfig, simulate
from testbed.workload.readers import read_azure_csv, resolve_path

AZURE_CONV = "azure_llm_trace_2023/AzureLLMInferenceTrace_conv.csv"


def _repeated_azure_csv(source: Path, num_requests: int, out: Path) -> Path:
    """The Azure hour repeated back to back until it holds num_requests requests, as an Azure
    CSV with TIMESTAMP in seconds. Repeated, not time-scaled: the load (arrival rate, lengths)
    stays that of the real hour, so wall time should grow linearly with the request count."""
    hour = read_azure_csv(source)
    gap_s = hour[-1].arrival_s / max(len(hour) - 1, 1)  # one mean inter-arrival between copies
    period_s = hour[-1].arrival_s + gap_s
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(num_requests):
        spec = hour[i % len(hour)]
        arrival_s = spec.arrival_s + (i // len(hour)) * period_s
        lines.append(f"{arrival_s!r},{spec.num_prompt_tokens},{spec.num_output_tokens}")
    out.write_text("\n".join(lines) + "\n")
    return out


def run(opts: BenchOptions, say: Say = print) -> list[dict]:
    """Wall time of simulating N Azure conversation requests with exit replay (consensus,
    hidden λ=0.95 from layer 4) and the H100 roofline of Llama-2-7B, for each N in --sizes.
    Up to the hour's 19,366 requests: its first N; beyond: the hour repeated back to back."""
    policy = PolicyConfig(batching="consensus", threshold=0.95, min_exit_layer=4)
    source = resolve_path(AZURE_CONV, opts.data_dir)
    num_in_hour = len(read_azure_csv(source))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in opts.sizes.split(",")]:
            path, how = source, "first N of the hour"
            if n > num_in_hour:
                path = _repeated_azure_csv(source, n, Path(tmp) / f"azure_conv_x{n}.csv")
                how = f"hour repeated {n / num_in_hour:.2f}x"
            cfg = SimulationConfig(
                trace=opts.trace, workload=f"azure:path={path},n={n}", policy=policy,
                cost_model="roofline:H100:llama-2-7b", data_dir=opts.data_dir,
            )  # fmt: skip
            start = time.perf_counter()
            result = simulate(cfg)
            wall = time.perf_counter() - start
            m = result.metrics
            rows.append({"num_requests": n, "workload": how, "wall_s": wall,
                         "requests_per_wall_s": n / wall, "num_steps": m.num_steps,
                         "steps_per_wall_s": m.num_steps / wall,
                         "simulated_s": m.duration_s})  # fmt: skip
            say(f"{n:7d} requests ({how})  {m.num_steps:8d} steps  simulated "
                  f"{m.duration_s:8.1f} s  wall {wall:7.2f} s  {n / wall:7.0f} requests/s  "
                  f"{m.num_steps / wall:7.0f} steps/s")  # fmt: skip
    write_run_info(
        opts.out, {"sizes": opts.sizes, "trace": opts.trace}, seed=0, suite="sim-speed", rows=rows
    )
    return rows
