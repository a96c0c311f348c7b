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


# the two: consensus (the fast path's common case) and rebatch (it parks and resumes)
POLICIES = (
    PolicyConfig(batching="consensus", threshold=0.95, min_exit_layer=4),
    PolicyConfig(batching="rebatch", threshold=0.95, min_exit_layer=4),
)


def run(opts: BenchOptions, say: Say = print) -> list[dict]:
    """Wall time of simulating N Azure conversation requests with exit replay (consensus and
    rebatch, hidden λ=0.95 from layer 4) and the H100 roofline of Llama-2-7B, for each N in
    --sizes; then each policy's wall time per simulated step over consensus's. Up to the hour's
    19,366 requests: its first N; beyond: the hour repeated back to back."""
    source = resolve_path(AZURE_CONV, opts.data_dir)
    num_in_hour = len(read_azure_csv(source))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in opts.sizes.split(",")]:
            path, how = source, "first N of the hour"
            if n > num_in_hour:
                path = _repeated_azure_csv(source, n, Path(tmp) / f"azure_conv_x{n}.csv")
                how = f"hour repeated {n / num_in_hour:.2f}x"
            for policy in POLICIES:
                rows.append(_timed(opts, policy, f"azure:path={path},n={n}", n, how))
                say(_line(rows[-1]))
    for n in dict.fromkeys(r["num_requests"] for r in rows):
        per_step = {r["policy"]: r["wall_s"] / max(r["num_steps"], 1)
                    for r in rows if r["num_requests"] == n}  # fmt: skip
        base = per_step[POLICIES[0].label()]
        say(f"{n:7d} requests: wall per step over {POLICIES[0].batching}'s: "
            + ", ".join(f"{label} {t / base:.2f}x" for label, t in per_step.items()))  # fmt: skip
    write_run_info(
        opts.out, {"sizes": opts.sizes, "trace": opts.trace}, seed=0, suite="sim-speed", rows=rows
    )
    return rows


def _timed(opts: BenchOptions, policy: PolicyConfig, workload: str, n: int, how: str) -> dict:
    cfg = SimulationConfig(trace=opts.trace, workload=workload, policy=policy,
                           cost_model="roofline:H100:llama-2-7b", data_dir=opts.data_dir)  # fmt: skip
    start = time.perf_counter()
    m = simulate(cfg).metrics
    wall = time.perf_counter() - start
    return {"policy": policy.label(), "num_requests": n, "workload": how, "wall_s": wall,
            "requests_per_wall_s": n / wall, "num_steps": m.num_steps,
            "steps_per_wall_s": m.num_steps / wall, "simulated_s": m.duration_s}  # fmt: skip


def _line(r: dict) -> str:
    return (f"{r['policy']:28s} {r['num_requests']:7d} requests ({r['workload']})  "
            f"{r['num_steps']:8d} steps  simulated {r['simulated_s']:8.1f} s  "
            f"wall {r['wall_s']:7.2f} s  {r['requests_per_wall_s']:7.0f} requests/s  "
            f"{r['steps_per_wall_s']:7.0f} steps/s")  # fmt: skip
