"""Exit adapters in exit_heads.safetensors: identity at init, used by every exit path, tied to
their backbone, and trained by self-distillation to agree more with the final layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from testbed.capture_records import EngineConfig
from testbed.core.policy_set import PolicyConfig
from testbed.engine.engine import LLMEngine
from testbed.engine.sampler import SamplingParams
from testbed.errors import CheckpointError
from testbed.model.checkpoint import EXIT_HEADS_FILE, load_checkpoint, save_exit_heads
from testbed.model.exit_training import (
    ExitTrainConfig,
    HiddenCache,
    distillation_vocab,
    init_adapters,
    probe_data,
    train_adapters,
)
from testbed.model.llama import exit_logits, exit_norm, exit_norm_stack
from tests.engine_helpers import TINY, prompts, tiny_checkpoint


def _random_adapters(ckpt, rank=4, seed=1):
    heads = init_adapters(ckpt.model, rank, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        heads.up.normal_(0, 0.3)
        heads.norm_weight.mul_(1.5)
        heads.weight.normal_(0, 0.5)
    return heads.eval()


def test_fresh_adapters_are_the_logit_lens(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    heads = init_adapters(ckpt.model, 4, torch.Generator().manual_seed(0))
    h = torch.randn(5, TINY.hidden_size)
    for layer in (1, 3, TINY.num_hidden_layers):
        lens = ckpt.model.exit_logits(h)
        assert torch.allclose(exit_logits(ckpt.model, heads, layer, h), lens, atol=1e-6)


def test_stacked_and_single_layer_norms_agree_and_last_layer_is_never_adapted(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    heads = _random_adapters(ckpt)
    states = torch.randn(TINY.num_hidden_layers, 3, TINY.hidden_size)
    stacked = exit_norm_stack(ckpt.model, heads, states)
    for layer in range(1, TINY.num_hidden_layers + 1):
        one = exit_norm(ckpt.model, heads, layer, states[layer - 1])
        assert torch.allclose(stacked[layer - 1], one, atol=1e-5)
    assert torch.allclose(stacked[-1], ckpt.model.model.norm(states[-1]))
    assert not torch.allclose(stacked[0], ckpt.model.model.norm(states[0]))


def test_saved_adapters_round_trip_and_change_the_early_exit_tokens(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "a")
    plain_dir = tmp_path / "a"
    policy = PolicyConfig(batching="shrink", exit_rule="hidden", threshold=0.0, min_exit_layer=2)
    cfg = EngineConfig(policy=policy)
    before = LLMEngine(ckpt, cfg).generate(prompts(4), SamplingParams(max_tokens=6))
    heads = _random_adapters(ckpt)
    save_exit_heads(plain_dir / EXIT_HEADS_FILE, heads, base_hash=None)
    loaded = load_checkpoint(plain_dir, require_tokenizer=False)
    assert loaded.exit_heads.adapter_rank == 4
    assert torch.allclose(loaded.exit_heads.up, heads.up)
    after = LLMEngine(loaded, cfg).generate(prompts(4), SamplingParams(max_tokens=6))
    assert all(set(o.exit_layers[1:]) == {2} for o in after)  # λ=0: every decode token at 2
    assert [o.token_ids for o in after] != [o.token_ids for o in before]


def test_adapters_trained_for_another_backbone_are_refused(tmp_path):
    a, b = tiny_checkpoint(tmp_path / "a", seed=0), tiny_checkpoint(tmp_path / "b", seed=1)
    from testbed.model.checkpoint import checkpoint_hash

    save_exit_heads(
        b.path / EXIT_HEADS_FILE, _random_adapters(a), base_hash=checkpoint_hash(a.path)
    )
    with pytest.raises(CheckpointError, match="trained for the checkpoint with hash"):
        load_checkpoint(b.path, require_tokenizer=False)
    assert load_checkpoint(b.path, require_tokenizer=False, exit_heads=False).exit_heads is None


def test_adapters_of_another_shape_are_refused(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "a")
    heads = _random_adapters(ckpt)
    bad = {k: v for k, v in heads.state_dict().items()}
    bad["down"] = torch.zeros(TINY.num_hidden_layers, TINY.hidden_size + 1, 4)
    from safetensors.torch import save_file

    save_file(
        {f"exit_heads.{k}": v.contiguous() for k, v in bad.items()},
        str(ckpt.path / EXIT_HEADS_FILE),
    )
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(ckpt.path, require_tokenizer=False)


def test_distillation_raises_agreement_with_the_final_layer(tmp_path):
    """States whose final-layer reading the logit lens gets wrong at layer 1 (a fixed rotation
    sits between them): the adapters learn it, so layer-1 agreement rises."""
    ckpt = tiny_checkpoint(tmp_path)
    gen = torch.Generator().manual_seed(0)
    L, d = TINY.num_hidden_layers, TINY.hidden_size
    final = torch.randn(600, d, generator=gen) * 3
    mix = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
    states = torch.stack([final @ mix if i < L - 1 else final for i in range(L)], dim=1)
    cache = HiddenCache(states.to(torch.bfloat16), 600)
    cfg = ExitTrainConfig(adapter_rank=d, num_steps=150, batch_positions=256, layers_per_step=L - 1,
                          lr=2e-2)  # fmt: skip
    vocab = distillation_vocab(ckpt.model, cache, TINY.vocab_size)
    heads = train_adapters(ckpt.model, cache, vocab, cfg, lambda *a: None)
    _, lens = probe_data(ckpt.model, None, cache.states)
    _, adapted = probe_data(ckpt.model, heads, cache.states)
    assert adapted[0].mean() > lens[0].mean() + 0.3
    assert float(adapted[-1].mean()) == 1.0


def test_probe_labels_match_a_direct_argmax(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    heads = _random_adapters(ckpt)
    states = torch.randn(40, TINY.num_hidden_layers, TINY.hidden_size)
    _, labels = probe_data(ckpt.model, heads, states)
    final = ckpt.model.exit_logits(states[:, -1]).argmax(-1)
    for layer in (1, 4):
        top = exit_logits(ckpt.model, heads, layer, states[:, layer - 1]).argmax(-1)
        assert np.array_equal(labels[layer - 1].numpy(), (top == final).float().numpy())
    assert F.relu(labels).sum() > 0
