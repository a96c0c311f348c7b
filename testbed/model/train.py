"""Multi-exit training of the built-in model, then its per-layer exit classifiers.

Every exit shares the final norm and LM head (LayerSkip); the loss is CALM's weighted sum over
exits, w_l = l / sum(1..L), so every exit learns to predict the next token while deeper ones
(which the final answer depends on) weigh more. Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from testbed.datasets import SummaryExample
from testbed.model.config import LlamaConfig
from testbed.model.llama import ExitClassifiers, LlamaModel

log = logging.getLogger(__name__)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 4
    rope_theta: float = 10000.0
    max_position_embeddings: int = 1024
    max_seq_len: int = 512  # training window: article head + summary
    max_summary_tokens: int = 96
    batch_size: int = 16
    num_steps: int = 600
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    classifier_steps: int = 300
    classifier_batches: int = 8  # training batches whose hidden states fit the probes
    exit_sample_fraction: float = 0.25  # positions scored at intermediate exits (cost, see loss)
    use_bf16: bool = True  # bf16 autocast: about 2x faster on CPUs with AVX512-BF16


def exit_loss_weights(num_layers: int) -> list[float]:
    total = num_layers * (num_layers + 1) / 2
    return [layer / total for layer in range(1, num_layers + 1)]


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_example(tok: Tokenizer, ex: SummaryExample, cfg: TrainConfig) -> list[int]:
    """<s> article-head \\nSummary: summary </s>, the article cut so the whole fits the window."""
    summary = tok.encode(" " + ex.reference).ids[: cfg.max_summary_tokens] + [EOS_ID]
    suffix = tok.encode("\nSummary:").ids
    room = cfg.max_seq_len - len(summary) - len(suffix) - 1
    article = tok.encode(ex.article).ids[:room]
    return [BOS_ID, *article, *suffix, *summary]


def model_config(cfg: TrainConfig, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def batches(
    seqs: list[list[int]], batch_size: int, rng: np.random.Generator
) -> Iterator[torch.Tensor]:
    """Endless shuffled batches, right-padded with PAD_ID: [B, T]."""
    while True:
        order = rng.permutation(len(seqs))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [seqs[j] for j in order[i : i + batch_size]]
            width = max(map(len, chunk))
            yield torch.tensor([s + [PAD_ID] * (width - len(s)) for s in chunk])


def multi_exit_loss(
    model: LlamaModel,
    batch: torch.Tensor,
    weights: Sequence[float],
    *,
    exit_sample_fraction: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Weighted cross-entropy over every exit. Intermediate exits may be scored on a random
    fraction of the positions: the LM head at eight exits otherwise costs more than the model."""
    inputs, targets = batch[:, :-1], batch[:, 1:].flatten()
    targets = targets.masked_fill(targets == PAD_ID, -100)
    states = model.dense_hidden_states(inputs)
    num_pos = targets.numel()
    sample = torch.randperm(num_pos, generator=generator)[
        : max(1, int(num_pos * exit_sample_fraction))
    ]
    loss = torch.zeros(())
    for i, (w, h) in enumerate(zip(weights, states, strict=True)):
        flat = h.flatten(0, 1)  # [B * T, hidden]
        idx = slice(None) if i == len(states) - 1 else sample
        logits = model.exit_logits(flat[idx])  # [positions, vocab]
        loss = loss + w * F.cross_entropy(logits.float(), targets[idx], ignore_index=-100)
    return loss


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.num_steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


ProgressFn = Callable[[int, float], None]


def train_model(
    cfg: TrainConfig, seqs: list[list[int]], vocab_size: int, progress: ProgressFn | None = None
) -> LlamaModel:
    with torch.random.fork_rng(
        devices=[]
    ):  # the config's seed, and the caller's RNG left as it was
        torch.manual_seed(cfg.seed)
        model = LlamaModel(model_config(cfg, vocab_size))
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02)
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    weights = exit_loss_weights(cfg.num_layers)
    stream = batches(seqs, cfg.batch_size, np.random.default_rng(cfg.seed))
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for step in range(cfg.num_steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.use_bf16):
            loss = multi_exit_loss(
                model,
                next(stream),
                weights,
                exit_sample_fraction=cfg.exit_sample_fraction,
                generator=gen,
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress is not None:
            progress(step, loss.item())
    return model.eval()


@torch.no_grad()
def _probe_features(
    model: LlamaModel, batch: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per exit point: normed hidden states [N, hidden] and labels (argmax equals final) [N]."""
    states = model.dense_hidden_states(batch[:, :-1])
    real = batch[:, 1:] != PAD_ID  # [B, T]
    final = model.exit_logits(states[-1]).argmax(-1)
    feats, labels = [], []
    for h in states:
        feats.append(model.model.norm(h)[real])
        labels.append((model.exit_logits(h).argmax(-1) == final)[real].float())
    return feats, labels


def fit_exit_classifiers(
    model: LlamaModel, seqs: list[list[int]], cfg: TrainConfig
) -> ExitClassifiers:
    """Logistic probes per layer; label = the layer's argmax equals the final layer's."""
    stream = batches(seqs, cfg.batch_size, np.random.default_rng(cfg.seed + 1))
    parts = [_probe_features(model, next(stream)) for _ in range(cfg.classifier_batches)]
    heads = ExitClassifiers(cfg.num_layers, cfg.hidden_size)
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    for _ in range(cfg.classifier_steps):
        loss = torch.zeros(())
        for layer in range(1, cfg.num_layers + 1):
            x = torch.cat([p[0][layer - 1] for p in parts])
            y = torch.cat([p[1][layer - 1] for p in parts])
            loss = loss + F.binary_cross_entropy_with_logits(heads.logit(layer, x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return heads.eval()
