"""Our Llama equals transformers' LlamaForCausalLM on tiny random configs."""

from __future__ import annotations

import pytest
import torch
import transformers

from testbed.model.checkpoint import load_checkpoint
from testbed.model.reference import greedy_generate

CONFIGS = {
    "gqa_untied_theta": dict(
        vocab_size=97, hidden_size=36, intermediate_size=50, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, rope_theta=5000.0, tie_word_embeddings=False,
    ),
    "mha_tied": dict(
        vocab_size=64, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=True,
    ),
    "mqa_odd": dict(
        vocab_size=101, hidden_size=30, intermediate_size=37, num_hidden_layers=4,
        num_attention_heads=5, num_key_value_heads=1, rope_theta=123456.0, tie_word_embeddings=False,
    ),
}  # fmt: skip
LENGTHS = (7, 1, 13, 4)


@pytest.fixture(params=sorted(CONFIGS))
def pair(request, tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(max_position_embeddings=64, **CONFIGS[request.param])
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_checkpoint(tmp_path, require_tokenizer=False).model
    return hf, ours


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        ids[row, :n] = torch.randint(0, vocab, (n,), generator=gen)
        mask[row, :n] = 1
    return ids, mask


@torch.no_grad()
def test_logits_equal_at_every_real_position(pair):
    hf, ours = pair
    ids, mask = _batch(hf.config.vocab_size)
    expected = hf(input_ids=ids, attention_mask=mask).logits
    got = ours(ids)
    real = mask.bool()
    assert got.shape == expected.shape
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)


@torch.no_grad()
def test_greedy_continuations_identical(pair):
    hf, ours = pair
    ids, mask = _batch(hf.config.vocab_size)
    for row, n in enumerate(LENGTHS):
        prompt = ids[row, :n].tolist()
        hf_out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
            pad_token_id=0, min_new_tokens=10,
        )[0, n:].tolist()  # fmt: skip
        ours_out, exits = greedy_generate(ours, prompt, 10)
        assert ours_out == hf_out
        assert exits == [ours.num_layers] * 10
