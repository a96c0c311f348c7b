"""Hardware and model shapes the roofline prices: named GPUs (peak FLOP/s, HBM bandwidth) and
Llama-architecture decoder shapes, from data sheets and published configs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from testbed.sim.cost_base import CostModelError


@dataclass(frozen=True)
class GpuSpec:
    name: str
    peak_flops_per_s: float  # dense BF16 tensor-core peak (no 2:4 sparsity)
    memory_bytes_per_s: float  # HBM bandwidth


# NVIDIA data sheets, SXM parts unless named otherwise. The sheets print BF16 tensor-core peaks
# "with sparsity" (2× dense); these are the dense halves: A100 312 TFLOPS (A100 data sheet: 1,555
# GB/s for 40 GB, 2,039 GB/s for 80 GB SXM), H100 SXM 989 TFLOPS and 3.35 TB/s, H100 PCIe 756
# TFLOPS and 2.0 TB/s (H100 data sheet), H200 SXM 989 TFLOPS and 4.8 TB/s (H200 data sheet).
GPUS: Mapping[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        GpuSpec("a100-40gb", 312e12, 1.555e12),
        GpuSpec("a100-80gb", 312e12, 2.039e12),
        GpuSpec("h100-pcie", 756e12, 2.0e12),
        GpuSpec("h100-sxm", 989e12, 3.35e12),
        GpuSpec("h200", 989e12, 4.8e12),
    )
}
GPU_ALIASES: Mapping[str, str] = {"a100": "a100-80gb", "h100": "h100-sxm", "h200-sxm": "h200"}


def gpu_spec(name: str) -> GpuSpec:
    key = GPU_ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in GPUS:
        known = ", ".join([*GPUS, *GPU_ALIASES])
        raise CostModelError(f"unknown GPU {name!r}; known: {known}")
    return GPUS[key]


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1}


@dataclass(frozen=True)
class ModelShape:
    """A Llama-architecture decoder: GQA attention, gated (SwiGLU) MLP, untied-or-tied LM head."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    bytes_per_param: float  # weights and K/V cache: 2 for bf16
    # the longest prompt + output it serves (config.json's max_position_embeddings); a simulation
    # priced on this shape takes requests up to this length (None: unknown)
    max_context_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads",
                     "num_kv_heads", "head_dim", "vocab_size", "bytes_per_param"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise CostModelError(
                    f"model shape: {name} must be positive, got {getattr(self, name)}"
                )
        if self.max_context_tokens is not None and self.max_context_tokens < 2:
            raise CostModelError(
                f"model shape: max_context_tokens must be >= 2, got {self.max_context_tokens}"
            )

    @property
    def kv_proj_params(self) -> int:
        """K and V projections of one layer."""
        return 2 * self.hidden_size * self.num_kv_heads * self.head_dim

    @property
    def params_per_layer(self) -> int:
        """Q, K, V, O projections plus gate, up and down of the MLP (norm weights are noise)."""
        q_and_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        return q_and_o + self.kv_proj_params + 3 * self.hidden_size * self.intermediate_size

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.bytes_per_param

    @property
    def lm_head_params(self) -> int:
        return self.hidden_size * self.vocab_size

    @classmethod
    def from_hf_config(
        cls, config: Mapping[str, Any], *, bytes_per_param: float | None = None
    ) -> ModelShape:
        """From a Hugging Face ``config.json`` dict; bytes from ``torch_dtype`` unless given."""
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            dims = dict(
                num_layers=int(config["num_hidden_layers"]), hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]), num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab_size=int(config["vocab_size"]),
                max_context_tokens=int(config.get("max_position_embeddings") or 0) or None,
            )  # fmt: skip
        except KeyError as exc:
            raise CostModelError(f"model config lacks {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise CostModelError(f"model config has a non-integer size: {exc}") from exc
        if bytes_per_param is None:
            bytes_per_param = _DTYPE_BYTES.get(str(config.get("torch_dtype")), 2)
        return cls(**dims, bytes_per_param=bytes_per_param)

    @classmethod
    def from_capture_meta(
        cls, meta: Mapping[str, Any], *, bytes_per_param: float = 2
    ) -> ModelShape:
        """The shape of the model a capture ran. Priced in bf16 by default whatever dtype the
        capture used, because the GPU peaks above are bf16 peaks."""
        try:
            config = meta["model"]["config"]
        except (KeyError, TypeError) as exc:
            raise CostModelError(
                "trace meta.json has no model.config to take a shape from"
            ) from exc
        return cls.from_hf_config(config, bytes_per_param=bytes_per_param)

    @classmethod
    def preset(cls, name: str) -> ModelShape:
        key = name.strip().lower()
        if key not in MODEL_PRESETS:
            raise CostModelError(f"unknown model {name!r}; presets: {', '.join(MODEL_PRESETS)}")
        return MODEL_PRESETS[key]


# Shapes from each model's published config.json (bf16).
MODEL_PRESETS: Mapping[str, ModelShape] = {
    "llama-2-7b": ModelShape(32, 4096, 11008, 32, 32, 128, 32000, 2, 4096),
    "llama-2-13b": ModelShape(40, 5120, 13824, 40, 40, 128, 32000, 2, 4096),
    "llama-2-70b": ModelShape(80, 8192, 28672, 64, 8, 128, 32000, 2, 4096),
    "llama-3-8b": ModelShape(32, 4096, 14336, 32, 8, 128, 128256, 2, 8192),
}
