"""Shared pieces of the verbs: typed errors to one line and exit code 2, progress output."""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable

from policies.errors import PolicyConfigError
from testbed.capture_records import DTYPE_NAMES
from testbed.core.errors import CoreError
from testbed.core.policy_set import PolicyConfig
from testbed.errors import ConfigError, EetbError

USER_ERRORS = (EetbError, PolicyConfigError, CoreError)
EXIT_BAD_INPUT = 2


def parser(verb: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"eetb {verb}", description=description)


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir", default=None, help="folder with the data sets (default: $EETB_DATA_DIR)"
    )


def guarded(main: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
    """Wrap a verb's main: bad input → one line on stderr, exit code 2, no traceback."""

    @functools.wraps(main)
    def run(argv: list[str]) -> int:
        try:
            return main(argv)
        except USER_ERRORS as exc:
            print(f"eetb: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            print("eetb: interrupted", file=sys.stderr)
            return 130

    return run


class ProgressLine:
    """One self-overwriting status line per phase on stderr (a plain line per update when
    stderr is not a terminal, throttled, so logs stay readable)."""

    def __init__(self, min_interval_s: float = 2.0) -> None:
        self.min_interval_s = min_interval_s
        self._last_s = 0.0
        self._is_tty = sys.stderr.isatty()

    def __call__(self, phase: str, done: int, total: int, note: str = "") -> None:
        now = time.monotonic()
        if done < total and now - self._last_s < self.min_interval_s:
            return
        self._last_s = now
        text = f"[{phase}] {done}/{total} {note}".rstrip()
        if self._is_tty:
            end = "\n" if done >= total else ""
            print(f"\r{text}\033[K", end=end, file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin", help="checkpoint directory or 'builtin'")


def add_policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("early exit (DESIGN §4)")
    g.add_argument(
        "--batching", default="full", help="full|consensus|quorum|shrink|rebatch|skipdecode"
    )
    g.add_argument(
        "--batching-param", action="append", default=[], metavar="KEY=VALUE",
        help="a batching policy parameter, e.g. fraction=0.75 (repeatable)",
    )  # fmt: skip
    g.add_argument("--rule", default="hidden", help="exit rule: softmax|hidden|classifier")
    g.add_argument("--threshold", type=float, default=0.9, help="λ of the exit rule")
    g.add_argument("--decay-tau", type=float, default=None, help="CALM's decaying threshold τ")
    g.add_argument("--min-exit-layer", type=int, default=1)
    g.add_argument("--exit-stride", type=int, default=1)
    g.add_argument("--fill", default="copy", help="KV fill: copy|lazy|recompute|skip")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The options of a verb that runs an engine: model, data directory, early-exit policy
    and device."""
    add_model(p)
    add_data_dir(p)
    add_policy_args(p)
    add_device_args(p)


def add_device_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device (native engine)")
    # names only: this module stays torch-free (simulate and sweep import it); the engine checks
    g.add_argument("--device", default="auto",
                   help="auto (CUDA when there is one), cpu, cuda or cuda:N")  # fmt: skip
    g.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)


def _number(text: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def policy_from_args(args: argparse.Namespace) -> PolicyConfig:
    params = []
    for item in args.batching_param:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--batching-param {item!r} is not KEY=VALUE")
        params.append((key, _number(value)))
    return PolicyConfig(
        batching=args.batching,
        batching_params=tuple(params),
        exit_rule=args.rule,
        threshold=args.threshold,
        decay_tau=args.decay_tau,
        min_exit_layer=args.min_exit_layer,
        exit_stride=args.exit_stride,
        kv_fill=args.fill,
    )
