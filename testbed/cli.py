"""``eetb <verb>``: each verb is a module in ``testbed.commands`` with a thin ``main(argv)``.

Verb modules are imported by name only when run, so ``eetb --help`` does not pay for torch.
Every typed library error becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Sequence

VERBS = {
    "model": "prepare a known pretrained model (smollm2-135m) into the local cache",
    "train": "train the built-in early-exit model and its exit classifiers",
    "train-exits": "train exit adapters and probes on a frozen pretrained model",
    "generate": "generate text with the native early-exit engine",
    "bench": "benchmark the native engine against transformers (and vLLM when installed)",
    "capture": "capture an oracle or live trace from the native engine",
    "trace": "inspect trace captures (trace info DIR)",
    "simulate": "simulate one policy on a trace replay (JSON and a table)",
    "sweep": "simulate a grid of policies from GRID.toml and rank them",
    "validate": "A/B-run top policies on a real engine and compare with the simulator",
    "report": "write report.md with figures and tables from a run folder",
    "demo": "capture → simulate → validate → report on the built-in model, offline",
}
USAGE = "usage: eetb <verb> [options]   (eetb <verb> --help for a verb's options)"


def _help() -> str:
    width = max(map(len, VERBS))
    lines = [USAGE, "", "eetb: an early-exit LLM inference testbed", "", "verbs:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, text in VERBS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_help())
        return 0 if args else 2
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        print(f"eetb: error: unknown verb {verb!r} (known: {', '.join(VERBS)})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(f"testbed.commands.{verb.replace('-', '_')}")
    try:
        return module.main(rest)
    except BrokenPipeError:  # `eetb ... | head`: the reader left; what it read is all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
