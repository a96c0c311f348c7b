"""The early-exit bench's grid scales with the model's depth; its ideal speedup counts the LM
head every token pays; the KV memory it asks for holds every request."""

from __future__ import annotations

import pytest

from testbed.bench.early_exit import (
    EarlyExitRow,
    lm_head_cost_layers,
    policy_grid,
    relative_to_full,
)
from testbed.bench.throughput import kv_cache_mb_for
from testbed.errors import ConfigError
from testbed.model.config import LlamaConfig

SMOL = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                   num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                   head_dim=64)  # fmt: skip


def test_grid_first_exit_layers_scale_with_depth():
    eight = {p.min_exit_layer for p in policy_grid(["hidden"], ["copy"], 8)[1:]}
    thirty = {p.min_exit_layer for p in policy_grid(["hidden"], ["copy"], 30)[1:]}
    assert eight == {1, 4, 5} and thirty == {1, 15, 19}
    only = policy_grid(["hidden"], ["copy"], 8, ["shrink"])
    assert {p.batching for p in only[1:]} == {"shrink"} and only[0].batching == "full"
    with pytest.raises(ConfigError, match="unknown rule"):
        policy_grid(["sofmax"], ["copy"], 8)


def test_lm_head_cost_of_smollm2_is_several_layers():
    assert 7.0 < lm_head_cost_layers(SMOL) < 9.0


def _row(label, decode_rl, tokens=100, wall=1.0):
    return EarlyExitRow(label, wall, tokens, 0.0, decode_rl, 0, 0.0, wall, 0.0)


def test_ideal_speedup_counts_the_head_once_per_token():
    full, half = _row("full", 100 * 30), _row("half", 100 * 15, wall=0.6)
    no_head = relative_to_full([full, half], [[], []], 0.0, 0.0)[1]
    with_head = relative_to_full([full, half], [[], []], 0.0, 8.0)[1]
    assert no_head.ideal_speedup == pytest.approx(2.0)
    assert with_head.ideal_speedup == pytest.approx(38 / 23)
    assert with_head.speedup == pytest.approx(1 / 0.6)


def test_kv_cache_for_smollm2_holds_the_tokens_asked_for():
    per_token_mb = 30 * 2 * 3 * 64 * 4 / 2**20
    assert kv_cache_mb_for(SMOL, 40_000) == pytest.approx(40_000 * per_token_mb)
    assert kv_cache_mb_for(SMOL, 10) == 256.0


def test_explicit_points_replace_the_default_grid():
    from testbed.bench.early_exit import parse_points

    points = parse_points("classifier:0.9:1,hidden:0.98:20")
    grid = policy_grid([], ["copy"], 30, ["shrink"], points)
    assert [(p.exit_rule, p.threshold, p.min_exit_layer) for p in grid[1:]] == points
    with pytest.raises(ConfigError, match="RULE:λ:FIRST_LAYER"):
        parse_points("classifier:0.9")
