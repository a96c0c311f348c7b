"""``eetb trace info DIR``: summarise a capture (requests, tokens, exit layers, agreement)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from policies import ExitPoints, create
from testbed.commands.common import guarded, parser
from testbed.sim.first_exit import replay_exit_layers
from testbed.trace import (
    Capture,
    agreement_by_layer,
    read_capture,
    signal_matrix,
)


@guarded
def main(argv: list[str]) -> int:
    p = parser("trace", "Inspect trace captures.")
    sub = p.add_subparsers(dest="action", required=True)
    info = sub.add_parser("info", help="summarise a capture directory")
    info.add_argument("path", type=Path)
    info.add_argument("--rule", default="hidden", help="exit rule for the histogram")
    info.add_argument("--threshold", type=float, default=0.95, help="λ for the histogram")
    info.add_argument("--min-exit-layer", type=int, default=None,
                      help="default: the capture's own (an oracle's recorded exit points)")  # fmt: skip
    info.add_argument("--exit-stride", type=int, default=None,
                      help="default: the capture's own")  # fmt: skip
    info.add_argument("--allow-partial", action="store_true", help="read an interrupted capture")
    args = p.parse_args(argv)
    cap = read_capture(args.path, allow_partial=args.allow_partial)
    rule = create("exit_rule", args.rule, threshold=args.threshold)
    policy = cap.meta.get("policy", {})
    points = ExitPoints(
        min_exit_layer=args.min_exit_layer or policy.get("min_exit_layer", 1),
        stride=args.exit_stride or policy.get("exit_stride", 1),
    )
    print(summary(cap, rule, points))
    return 0


def summary(cap: Capture, rule, points: ExitPoints) -> str:
    L = cap.num_layers
    m = cap.meta
    exit_layers = cap.tokens["exit_layer"].to_numpy()
    wall_s = float(np.max(cap.requests["finish_s"].to_numpy(), initial=0.0))
    lines = [
        f"capture {cap.path.name}: {m['mode']}, schema {m['schema_version']}"
        f"{', PARTIAL' if cap.is_partial else ''}; model {m['model']['name']} ({L} layers, "
        f"{m['model']['checkpoint_hash']}); engine {m['engine']['name']} {m['engine']['version']}",
        f"workload {m.get('workload') or '-'}; policy {m['policy']['batching']}; seed {m['seed']}",
        f"requests {cap.requests.num_rows}, tokens {cap.tokens.num_rows}, "
        f"steps {cap.steps.num_rows}, wall {wall_s:.2f} s, "
        f"mean recorded exit layer {exit_layers.mean():.2f}",
    ]
    replayed = replay_exit_layers(cap, rule, points)
    decode = cap.tokens["position"].to_numpy() > 0
    lines.append(
        f"\nexit layers replayed for {rule.name} λ={rule.threshold:g} "
        f"(exit points {', '.join(map(str, points.layers(L)))}), {int(decode.sum())} decode tokens:"
    )
    counts = np.bincount(replayed[decode], minlength=L + 1)[1:]
    total = max(1, int(decode.sum()))
    for layer, n in enumerate(counts, start=1):
        lines.append(f"  layer {layer:2d}: {n:6d}  {n / total:6.1%}  {'#' * round(40 * n / total)}")
    lines.append(f"  mean exit layer {replayed[decode].mean() if decode.any() else L:.2f}")
    if m["mode"] == "oracle":
        agree = agreement_by_layer(cap)
        lines.append("\nagreement with the final token by exit layer:")
        recorded = cap.oracle_layers or ()
        lines.append("  " + "  ".join(f"{layer}: {agree[layer - 1]:.1%}" for layer in recorded))
        est = agree_at(cap, replayed)
        lines.append(f"estimated agreement with full depth for this rule and λ: {est:.1%}")
    return "\n".join(lines)


def agree_at(cap: Capture, exit_layers: np.ndarray) -> float:
    """Fraction of tokens whose argmax at their replayed exit layer equals the final token."""
    matches = signal_matrix(cap.tokens, "matches_final", cap.num_layers)
    return float(matches[np.arange(len(exit_layers)), exit_layers - 1].mean())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
