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


def _dense_states(model, tokens, computed, *, skip_missing: bool):
    """From-scratch forward of one sequence; returns states [L+1, T, hidden].

    computed[p] = layers position p ran. A position stops updating at its computed depth, and
    deeper layers read K/V from its frozen state (copy fill) or, with skip_missing, not at all.
    """
    import torch.nn.functional as F

    T = len(tokens)
    h = model.embed(torch.tensor(tokens))
    cos, sin = model.rope(torch.arange(T), h.dtype)
    depth = torch.tensor(computed)
    states = [h]
    for j, layer in enumerate(model.layers):
        q, k, v = layer.qkv(h, cos, sin)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        if skip_missing:
            mask &= (depth > j)[None, :] | torch.eye(T, dtype=torch.bool)
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
        ).transpose(0, 1)
        new = layer.finish(h, attn)
        h = torch.where((depth > j)[:, None], new, h)
        states.append(h)
    return torch.stack(states)


@torch.inference_mode()
def reference_generate(model, prompts, max_new, *, threshold, batching="consensus", fill="copy"):
    """Lockstep early exit over a batch by recomputing every sequence from scratch each step.

    Hidden-cosine rule at every layer 1..L-1; prefill tokens run full depth. consensus: every row
    takes its token at its first confident layer, the batch runs to the deepest of those; shrink:
    each row stops at its own. Returns (tokens, exit layers) per prompt.
    """
    import torch.nn.functional as F

    L = model.num_layers
    seqs = [list(p) for p in prompts]
    computed = [[L] * len(p) for p in prompts]
    outs = [([], []) for _ in prompts]
    for step in range(max_new):
        firsts, states_all = [], []
        for s, toks in enumerate(seqs):
            states = _dense_states(model, toks, computed[s], skip_missing=fill == "skip")
            states_all.append(states)
            first = L
            if step > 0:  # the first token comes from the prefill, at full depth
                for layer in range(1, L):
                    cos = F.cosine_similarity(states[layer, -1], states[layer - 1, -1], dim=-1)
                    if cos >= threshold:
                        first = layer
                        break
            firsts.append(first)
        stop = max(firsts)
        for s, toks in enumerate(seqs):
            e = firsts[s]
            token = int(model.exit_logits(states_all[s][e, -1]).argmax())
            outs[s][0].append(token)
            outs[s][1].append(e)
            depth = stop if batching == "consensus" else e
            computed[s][-1] = depth  # the newest position ran this many layers
            toks.append(token)
            computed[s].append(L)  # placeholder for the next fed token (recomputed next step)
    return outs
