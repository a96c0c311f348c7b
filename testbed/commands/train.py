"""``eetb train``: train the built-in early-exit model (see testbed/model/recipe.py)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from testbed.commands.common import ProgressLine, add_data_dir, guarded, parser
from testbed.model.recipe import RecipeConfig, build_builtin_model
from testbed.model.train import TrainConfig


@guarded
def main(argv: list[str]) -> int:
    p = parser("train", "Train a small early-exit Llama from scratch, then its exit probes.")
    add_data_dir(p)
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--steps", type=int, default=TrainConfig.num_steps)
    p.add_argument("--eval-articles", type=int, default=RecipeConfig.num_eval_articles)
    args = p.parse_args(argv)
    if args.steps <= 0 or args.eval_articles <= 0:
        p.error("--steps and --eval-articles must be positive")
    cfg = RecipeConfig(
        train=dataclasses.replace(TrainConfig(), seed=args.seed, num_steps=args.steps),
        num_eval_articles=args.eval_articles,
    )
    report = build_builtin_model(cfg, args.data_dir, args.out, ProgressLine())
    print(f"wrote {args.out} (model card: {args.out / 'MODEL_CARD.md'})")
    for s in report.layers:
        print(f"layer {s.layer}: agreement {s.agreement:.1%}, mean margin {s.mean_margin:.3f}")
    print(f"ROUGE-L {report.rouge_l:.4f} (lead-3 {report.lead3_rouge_l:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
