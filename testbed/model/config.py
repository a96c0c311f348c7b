"""Model shape, read from and written to an HF-format ``config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from testbed.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # < num_attention_heads means grouped-query attention
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    head_dim: int | None = None  # None: hidden_size // num_attention_heads

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise CheckpointError("hidden_size is not a multiple of num_attention_heads")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    def to_hf_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(
            architectures=list(SUPPORTED_ARCHITECTURES[:1]),
            model_type="llama",
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            torch_dtype="float32",
        )
        out["head_dim"] = self.head_size
        return out

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> LlamaConfig:
        archs = raw.get("architectures") or []
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise CheckpointError(
                f"unsupported architecture {archs!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"unsupported hidden_act {raw['hidden_act']!r} (need silu)")
        rope_scaling = raw.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) != "default":
            raise CheckpointError(f"unsupported rope_scaling {rope_scaling!r}")
        theta = raw.get("rope_theta")
        if theta is None:  # transformers 5 nests it under rope_parameters
            theta = (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in fields}
        kwargs.update(rope_theta=float(theta), eos_token_id=eos)
        kwargs.setdefault("num_key_value_heads", raw.get("num_attention_heads"))
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise CheckpointError(f"config.json is missing a field: {exc}") from exc
