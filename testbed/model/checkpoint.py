"""HF-format checkpoint directories: config.json, *.safetensors, tokenizer.json, exit heads.

Only safetensors are read: a pickle checkpoint (``*.bin``, ``*.pt``) can run arbitrary code when
loaded, so it is refused with a message saying how to convert it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from testbed.atomic import atomic_path
from testbed.errors import CheckpointError
from testbed.jsonfile import read_object
from testbed.model.config import LlamaConfig
from testbed.model.llama import ExitClassifiers, LlamaModel
from testbed.model.prompt import PromptFormat, read_prompt_format

EXIT_HEADS_FILE = "exit_heads.safetensors"
# exit_heads.safetensors metadata: checkpoint_hash of the backbone the adapters were trained on
BASE_HASH_KEY = "base_checkpoint_hash"
WEIGHTS_FILE = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# buffers some exporters write that carry no learned state
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    model: LlamaModel
    exit_heads: ExitClassifiers | None  # None when the directory has no exit_heads.safetensors
    tokenizer: Tokenizer | None  # None when loaded with require_tokenizer=False and absent
    prompt: PromptFormat = PromptFormat()  # how text becomes prompt ids (prompt_format.json)

    @property
    def config(self) -> LlamaConfig:
        return self.model.config


def read_config(path: Path) -> LlamaConfig:
    cfg_file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing: not an HF-format checkpoint directory")
    return LlamaConfig.from_hf_dict(read_object(cfg_file, CheckpointError))


def _weight_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.glob("*.safetensors") if p.name != EXIT_HEADS_FILE)
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle weights ({', '.join(pickles)}); pickle checkpoints are "
            "refused because loading them can run code: convert them to safetensors first"
        )
    raise CheckpointError(f"{path} has no *.safetensors weight file")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is corrupt or truncated: {exc}") from exc


def _check_and_fill(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = model.state_dict()
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, tensor in tensors.items():
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        if name not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {name!r} for this architecture")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[name].shape)}"
            )
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    model.load_state_dict({k: v for k, v in tensors.items() if k in expected})


def load_tokenizer(path: Path) -> Tokenizer:
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint has no tokenizer")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise CheckpointError(f"{file} is not a valid tokenizer: {exc}") from exc


def load_checkpoint(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    require_tokenizer: bool = True,
    exit_heads: bool = True,
) -> Checkpoint:
    """exit_heads=False ignores exit_heads.safetensors (the backbone alone)."""
    path = Path(path)
    cfg = read_config(path)
    model = LlamaModel(cfg)
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        tensors.update(_read_tensors(file))
    _check_and_fill(model, tensors, path)
    heads = None
    if exit_heads and (path / EXIT_HEADS_FILE).is_file():
        heads = load_exit_heads(path / EXIT_HEADS_FILE, cfg, base_dir=path).to(dtype).eval()
    tokenizer = None
    if require_tokenizer or (path / "tokenizer.json").exists():
        tokenizer = load_tokenizer(path)
    return Checkpoint(path, model.to(dtype).eval(), heads, tokenizer, read_prompt_format(path))


def load_exit_heads(file: Path, cfg: LlamaConfig, *, base_dir: Path | None) -> ExitClassifiers:
    """Probes (and adapters, when the file has them) for a model of shape cfg. A file that
    records the backbone it was trained on is refused for another one (base_dir's hash)."""
    raw = {k.removeprefix("exit_heads."): v for k, v in _read_tensors(file).items()}
    base = _metadata(file).get(BASE_HASH_KEY)
    if base is not None and base_dir is not None and base != checkpoint_hash(base_dir):
        raise CheckpointError(
            f"{file} was trained for the checkpoint with hash {base}, not {base_dir} "
            f"({checkpoint_hash(base_dir)}): train it again with `eetb train-exits`"
        )
    rank = raw["down"].shape[-1] if "down" in raw and raw["down"].dim() == 3 else None
    heads = ExitClassifiers(cfg.num_hidden_layers, cfg.hidden_size, rank)
    _check_and_fill(heads, raw, file)
    return heads


def _metadata(file: Path) -> dict[str, str]:
    try:
        with safe_open(str(file), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file} is corrupt or truncated: {exc}") from exc


def save_checkpoint(
    path: str | Path,
    model: LlamaModel,
    *,
    tokenizer: Tokenizer | None = None,
    exit_heads: ExitClassifiers | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write an HF-format directory that transformers' LlamaForCausalLM loads as it is."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_hf_dict() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    if exit_heads is not None:
        save_exit_heads(path / EXIT_HEADS_FILE, exit_heads)
    if tokenizer is not None:
        tokenizer.save(str(path / "tokenizer.json"))
        _write_tokenizer_config(path, model.config)
    return path


def save_exit_heads(
    file: Path, heads: ExitClassifiers, *, base_hash: str | None = None, dtype=torch.float32
) -> None:
    """Write exit_heads.safetensors via a temporary name; base_hash ties it to its backbone."""
    state = {
        f"exit_heads.{k}": v.detach().to(dtype).contiguous() for k, v in heads.state_dict().items()
    }
    meta = {"format": "pt"} | ({BASE_HASH_KEY: base_hash} if base_hash else {})
    with atomic_path(file) as tmp:
        save_file(state, str(tmp), metadata=meta)


def _write_tokenizer_config(path: Path, cfg: LlamaConfig) -> None:
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_position_embeddings,
    }
    tok_cfg.update(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


def checkpoint_hash(path: str | Path) -> str:
    """sha256 over config and weight files: identifies the model a trace was captured from."""
    digest = hashlib.sha256()
    path = Path(path)
    for file in [path / "config.json", *_weight_files(path)]:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
