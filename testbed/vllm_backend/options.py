"""Early-exit settings of the vLLM model: the ``eetb`` key of ``hf_overrides``, checked.

vLLM passes ``hf_overrides`` into the HF config the model is built from, so a policy chosen on
the command line (``vllm serve --hf-overrides``) or in Python (``vllm.LLM(hf_overrides=...)``)
reaches the model without any channel of our own. This module imports no vLLM and no torch,
so the CLI can refuse a policy before vLLM starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.core.policy_set import PolicyConfig
from testbed.errors import ConfigError

ARCHITECTURE = "EarlyExitLlamaForCausalLM"
OVERRIDES_KEY = "eetb"  # hf_overrides[OVERRIDES_KEY] holds the settings below
RECORD_MODES = ("off", "live", "oracle")

# Why each policy vLLM cannot run is refused: one vLLM forward covers every token of the batch
# in one attention call per layer and one row per sequence per step.
REFUSED_BATCHING = {
    "shrink": "rows cannot leave a vLLM batch layer by layer: each layer's attention runs over "
    "every token of the step in one call, so exited rows would still be computed (use consensus)",
    "rebatch": "parking rows and running their deep layers in a later step needs a scheduler "
    "that splits one sequence's step in two; vLLM schedules each sequence once per step",
    "skipdecode": "its exit layer depends on each row's output index and max_tokens, which vLLM "
    "does not pass to the model",
}
REFUSED_FILL = {
    "lazy": "it pushes owed positions through the deep layers in a later step, which vLLM's "
    "scheduler cannot add to a sequence's step",
    "recompute": "it recomputes owed positions from layer 0 in a later step, which vLLM's "
    "scheduler cannot add to a sequence's step",
    "skip": "vLLM's paged attention kernels take no per-position mask, so deeper layers cannot "
    "ignore the positions that were not written",
}
_FIELDS = {f.name for f in dataclasses.fields(PolicyConfig)}
_EXTRA = {"record", "record_dir"}


@dataclass(frozen=True)
class VllmEarlyExitConfig:
    policy: PolicyConfig = PolicyConfig()
    record: str = "off"  # off | live (what the policy did) | oracle (every signal, full depth)
    record_dir: Path | None = None  # `vllm serve`: the model appends its step log here

    def __post_init__(self) -> None:
        if self.record not in RECORD_MODES:
            raise ConfigError(
                f"eetb record mode {self.record!r} is not one of {', '.join(RECORD_MODES)}"
            )
        check_supported(self.policy)
        if self.record == "oracle" and self.policy.batching != "full":
            raise ConfigError("an oracle recording runs full depth: use batching 'full'")


def check_supported(policy: PolicyConfig) -> None:
    """Raise ConfigError when the vLLM backend cannot run ``policy``, saying why."""
    if policy.batching in REFUSED_BATCHING:
        raise ConfigError(
            f"vLLM cannot run batching '{policy.batching}': {REFUSED_BATCHING[policy.batching]}"
        )
    if policy.batching != "full" and policy.kv_fill in REFUSED_FILL:
        raise ConfigError(f"vLLM cannot run KV fill '{policy.kv_fill}': "
                          f"{REFUSED_FILL[policy.kv_fill]}")  # fmt: skip
    if policy.decay_tau is not None:
        raise ConfigError(
            "vLLM cannot run CALM's decaying threshold (decay_tau): it needs each row's output "
            "index and max_tokens, which vLLM does not pass to the model"
        )


def parse_overrides(raw: Any) -> VllmEarlyExitConfig:
    """The ``eetb`` mapping of an HF config (absent: full depth, no recording)."""
    if raw is None:
        return VllmEarlyExitConfig()
    if not isinstance(raw, dict):
        raise ConfigError(f"hf_overrides['{OVERRIDES_KEY}'] must be a mapping, got {raw!r}")
    unknown = set(raw) - _FIELDS - _EXTRA
    if unknown:
        known = ", ".join(sorted(_FIELDS | _EXTRA))
        raise ConfigError(
            f"unknown hf_overrides['{OVERRIDES_KEY}'] key(s) {sorted(unknown)} (known: {known})"
        )
    fields = {k: v for k, v in raw.items() if k in _FIELDS}
    for key in ("batching_params", "kv_fill_params"):
        value = fields.get(key, {})
        if not isinstance(value, dict):
            raise ConfigError(f"hf_overrides['{OVERRIDES_KEY}']['{key}'] must be a mapping")
        fields[key] = tuple(sorted(value.items()))
    try:
        policy = PolicyConfig(**fields)
    except TypeError as exc:
        raise ConfigError(f"hf_overrides['{OVERRIDES_KEY}']: {exc}") from exc
    record_dir = raw.get("record_dir")
    return VllmEarlyExitConfig(
        policy, raw.get("record", "off"), Path(record_dir) if record_dir else None
    )


def to_overrides(cfg: VllmEarlyExitConfig) -> dict[str, Any]:
    """The ``hf_overrides`` that select the early-exit model with these settings."""
    settings: dict[str, Any] = dataclasses.asdict(cfg.policy)
    settings["batching_params"] = dict(cfg.policy.batching_params)
    settings["kv_fill_params"] = dict(cfg.policy.kv_fill_params)
    settings["record"] = cfg.record
    if cfg.record_dir is not None:
        settings["record_dir"] = str(cfg.record_dir)
    return {"architectures": [ARCHITECTURE], OVERRIDES_KEY: settings}
