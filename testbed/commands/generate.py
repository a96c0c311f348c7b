"""``eetb generate``: run prompts through the native early-exit engine and print the outputs."""

from __future__ import annotations

import json
import sys

from testbed.builtin_model import resolve_model_dir
from testbed.capture_records import EngineConfig
from testbed.commands.common import (
    add_engine_args,
    guarded,
    parser,
    policy_from_args,
)
from testbed.core import SchedulerConfig
from testbed.datasets import load_summaries
from testbed.engine.engine import LLMEngine
from testbed.engine.sampler import SamplingParams
from testbed.model.checkpoint import load_checkpoint

MAX_ARTICLE_CHARS = 1500  # data-set prompts are cut so they fit the built-in model's context


@guarded
def main(argv: list[str]) -> int:
    p = parser("generate", "Generate with the native early-exit engine.")
    add_engine_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-from-data", type=int, default=0, metavar="N",
                   help="also summarise the first N evaluation articles of --dataset")  # fmt: skip
    p.add_argument("--dataset", default="cnndm", help="cnndm|xsum|scitldr")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print one JSON object per output")
    args = p.parse_args(argv)
    if not args.prompt and not args.prompts_from_data:
        p.error("give --prompt TEXT or --prompts-from-data N")
    ckpt = load_checkpoint(resolve_model_dir(args.model))
    prompts = list(args.prompt)
    if args.prompts_from_data:
        examples = load_summaries(args.dataset, "eval", args.data_dir)[: args.prompts_from_data]
        prompts += [ckpt.prompt.summary_request(ex.article[:MAX_ARTICLE_CHARS], args.dataset)
                    for ex in examples]  # fmt: skip
    cfg = EngineConfig(
        policy=policy_from_args(args),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs),
        seed=args.seed, device=args.device, dtype=args.dtype,
    )  # fmt: skip
    engine = LLMEngine(ckpt, cfg)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p
    )
    outputs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outputs, strict=True):
        mean_exit = sum(out.exit_layers) / max(1, len(out.exit_layers))
        if args.json:
            record = {"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                      "exit_layers": out.exit_layers}  # fmt: skip
            print(json.dumps(record))
            continue
        head = prompt if len(prompt) <= 80 else prompt[:60] + " … " + prompt[-16:]
        print(f"--- {head!r}")
        print(f"{out.text.strip()}")
        print(f"[{len(out.token_ids)} tokens, mean exit layer {mean_exit:.2f}/{engine.num_layers}]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
