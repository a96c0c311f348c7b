"""Decision-only early-exit policies over numpy arrays, shared by every engine and the simulator.

Three kinds: exit rules (signals -> confident rows), batching policies (who takes a token, runs
on or parks at an exit point) and KV-fill policies (what happens to K/V of skipped layers).
Imports numpy only, so the scheduler, the simulator and the vLLM backend can all use it.
"""

from policies.batching import (
    BatchDecision,
    BatchingPolicy,
    ConsensusBatching,
    FullBatching,
    QuorumBatching,
    ShrinkBatching,
    SkipDecodeBatching,
)
from policies.errors import PolicyConfigError, UnknownPolicyError
from policies.exit_rules import (
    EXIT_RULES,
    ClassifierRule,
    ExitPoints,
    ExitSignals,
    HiddenCosineRule,
    SoftmaxMarginRule,
    ThresholdRule,
)
from policies.kv_fill import (
    KV_FILL_POLICIES,
    CopyFill,
    FillDecision,
    KvFillPolicy,
    LazyFill,
    RecomputeFill,
    SkipFill,
    skipped_layers,
)
from policies.rebatch import RebatchBatching
from policies.registry import (
    BATCHING_POLICIES,
    ENTRY_POINT_GROUP,
    KINDS,
    Registry,
    available,
    create,
)

__all__ = [
    "BATCHING_POLICIES",
    "ENTRY_POINT_GROUP",
    "EXIT_RULES",
    "KINDS",
    "KV_FILL_POLICIES",
    "BatchDecision",
    "BatchingPolicy",
    "ClassifierRule",
    "ConsensusBatching",
    "CopyFill",
    "ExitPoints",
    "ExitSignals",
    "FillDecision",
    "FullBatching",
    "HiddenCosineRule",
    "KvFillPolicy",
    "LazyFill",
    "PolicyConfigError",
    "QuorumBatching",
    "RebatchBatching",
    "RecomputeFill",
    "Registry",
    "ShrinkBatching",
    "SkipDecodeBatching",
    "SkipFill",
    "SoftmaxMarginRule",
    "ThresholdRule",
    "UnknownPolicyError",
    "available",
    "create",
    "skipped_layers",
]
