"""The built-in model's trainer: seeded by its config alone, the caller's RNG untouched."""

from __future__ import annotations

import torch

from testbed.model.train import TrainConfig, train_model

TINY = TrainConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                   num_kv_heads=1, max_seq_len=16, batch_size=2, num_steps=2, warmup_steps=1,
                   use_bf16=False)  # fmt: skip
SEQS = [list(range(1, 13)), list(range(5, 20)), list(range(2, 9))]


def test_training_is_seeded_by_the_config_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = train_model(TINY, SEQS, vocab_size=64)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # another global state: the same model all the same
    second = train_model(TINY, SEQS, vocab_size=64)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
