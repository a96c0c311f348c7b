"""Shared fixtures for engine tests: tiny random checkpoints and a from-scratch reference."""

from __future__ import annotations

from pathlib import Path

import torch

from testbed.model.checkpoint import load_checkpoint, save_checkpoint
from testbed.model.config import LlamaConfig
from testbed.model.llama import ExitClassifiers, LlamaModel

TINY = LlamaConfig(
    vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rope_theta=5000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def tiny_checkpoint(path: Path, seed: int = 0, *, scale: float = 0.3):
    """A random tiny Llama whose deeper layers change the hidden state little, so that
    early-exit thresholds fire on some tokens but not all."""
    torch.manual_seed(seed)
    model = LlamaModel(TINY)
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=scale)
    heads = ExitClassifiers(TINY.num_hidden_layers, TINY.hidden_size)
    torch.nn.init.normal_(heads.weight, std=0.5)
    save_checkpoint(path, model, exit_heads=heads)
    return load_checkpoint(path, require_tokenizer=False)


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 20) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=gen).tolist()
    return [torch.randint(3, TINY.vocab_size, (k,), generator=gen).tolist() for k in lengths]
