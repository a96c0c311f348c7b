"""``eetb train-exits``: exit adapters and probes for a frozen model (testbed/exits_recipe.py)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from testbed.builtin_model import resolve_model_dir
from testbed.commands.common import ProgressLine, add_data_dir, add_model, guarded, parser
from testbed.exits_recipe import ExitRecipeConfig, build_exit_heads
from testbed.model.checkpoint import load_checkpoint
from testbed.model.exit_training import ExitTrainConfig


@guarded
def main(argv: list[str]) -> int:
    p = parser("train-exits", "Train exit adapters and CALM probes on a frozen model by "
                              "self-distillation against its final layer.")  # fmt: skip
    add_model(p)
    add_data_dir(p)
    p.add_argument("--out", type=Path, default=None,
                   help="folder for exit_heads.safetensors and its card (default: the checkpoint)")  # fmt: skip
    p.add_argument("--seed", type=int, default=ExitTrainConfig.seed)
    p.add_argument("--steps", type=int, default=ExitTrainConfig.num_steps)
    p.add_argument("--examples", type=int, default=ExitTrainConfig.num_examples)
    p.add_argument("--rank", type=int, default=ExitTrainConfig.adapter_rank)
    p.add_argument("--eval-articles", type=int, default=ExitRecipeConfig.num_eval_articles)
    args = p.parse_args(argv)
    if min(args.steps, args.examples, args.rank, args.eval_articles) <= 0:
        p.error("--steps, --examples, --rank and --eval-articles must be positive")
    # the backbone alone: exits are trained from the logit lens, not from an older file
    ckpt = load_checkpoint(resolve_model_dir(args.model), exit_heads=False)
    train = dataclasses.replace(ExitTrainConfig(), seed=args.seed, num_steps=args.steps,
                                num_examples=args.examples, adapter_rank=args.rank)  # fmt: skip
    cfg = ExitRecipeConfig(train=train, num_eval_articles=args.eval_articles)
    out = args.out or ckpt.path
    facts = build_exit_heads(ckpt, cfg, args.data_dir, out, ProgressLine())
    print(f"wrote {out / 'exit_heads.safetensors'} ({facts['file_bytes'] / 1e6:.2f} MB; "
          f"card {out / 'EXITS_CARD.md'})")  # fmt: skip
    L = ckpt.config.num_hidden_layers
    for name, after in facts["agreement_adapters"].items():
        before = facts["agreement_logit_lens"][name]
        cells = ", ".join(f"{layer}: {before[layer - 1]:.0%}→{after[layer - 1]:.0%}"
                          for layer in range(L // 4, L, max(1, L // 8)))  # fmt: skip
        print(f"{name} agreement, logit lens → adapters: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
