"""The roofline's per-layer time for Llama-2-7B on an H100 against Vidur's measured operators.

    python scripts/roofline_vs_vidur.py [--data-dir DIR]

Vidur (microsoft/vidur) profiled every operator of a Llama-2-7B decoder layer on an H100 SXM
(``vidur_op_profiles/h100_Llama-2-7b-hf_mlp.csv`` in the data directory: norms, QKV and output
projections, RoPE, the MLP, K/V cache writes; attention over the context is not in that file).
The roofline prices the same work (context 0) at the GPU's peaks. Measured / roofline is the
efficiency the roofline leaves out; the table and its median are the figure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from testbed.datasets import DATA_DIR_ENV
from testbed.sim.cost_model import build_cost_model
from testbed.sim.profile_cost import ProfileCostModel
from testbed.workload.readers import resolve_path

PROFILE = "vidur_op_profiles/h100_Llama-2-7b-hf_mlp.csv"
TOKENS = (1, 8, 32, 128, 512, 1024, 2048, 4096)


def compare(profile_csv: Path) -> list[tuple[int, float, float]]:
    """(tokens, measured ms, roofline ms) per layer for each token count of TOKENS."""
    measured = ProfileCostModel.from_csv(profile_csv)
    roofline = build_cost_model("roofline:H100:llama-2-7b")
    layer_ms = np.interp(TOKENS, measured.num_tokens, measured.layer_ms)
    return [(t, float(m), roofline.layer_time_s(t, 0) * 1e3)
            for t, m in zip(TOKENS, layer_ms, strict=True)]  # fmt: skip


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help=f"default: ${DATA_DIR_ENV}")
    args = p.parse_args(argv)
    path = resolve_path(PROFILE, args.data_dir)
    if not path.is_file():
        print(f"roofline_vs_vidur: {PROFILE} not found under the data directory", file=sys.stderr)
        return 2
    rows = compare(path)
    print(
        f"{'tokens':>7} {'Vidur ms/layer':>15} {'roofline ms/layer':>18} {'measured/roofline':>18}"
    )
    for t, m, r in rows:
        print(f"{t:7d} {m:15.4f} {r:18.4f} {m / r:17.2f}x")
    ratios = [m / r for _, m, r in rows]
    print(f"median measured/roofline {np.median(ratios):.2f}x: the H100 ran these kernels at "
          f"{1 / np.median(ratios):.0%} of the roofline's peak")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
