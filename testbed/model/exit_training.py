"""Exit adapters and probes for a frozen pretrained model, by self-distillation (``train-exits``).

A pretrained Llama's intermediate layers are not trained to be read by its final norm and LM head
(on SmolLM2-135M the logit lens agrees with the last layer on a few percent of tokens by mid-depth),
so each exit layer l gets a small adapter n_l(h) = RMSNorm(h + h A_l B_l) · g_l (see
``ExitClassifiers``) trained to make LM-head(n_l(h_l)) match the final layer's distribution.
The backbone is frozen, so its hidden states are computed once and cached; the loss is a KL
divergence over a vocabulary subset (the tokens the final layer ranks highest on the training
positions), which makes a step cost a fraction of a full-vocabulary softmax. CALM's probes are
then fitted on the adapted exits: label = the exit's full-vocabulary argmax equals the final one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from testbed.datasets import SummaryExample
from testbed.model.checkpoint import Checkpoint
from testbed.model.llama import ExitClassifiers, LlamaModel, exit_norm_stack

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int, str], None]  # (phase, done, total, note)


@dataclass(frozen=True)
class ExitTrainConfig:
    seed: int = 0
    num_examples: int = 240  # training article/summary pairs, spread over the training sets
    max_article_chars: int = 1500  # about 350 tokens of each article
    prompt_positions: int = 16  # random prompt positions cached per example besides the answer
    adapter_rank: int = 32
    vocab_subset: int = 8192  # distillation vocabulary: the final layer's most frequent top-8
    num_steps: int = 800
    batch_positions: int = 512
    layers_per_step: int = 12  # exit layers trained per step (a random draw), bounding its cost
    lr: float = 1e-2
    probe_positions: int = 3000  # positions whose full-vocabulary argmax labels the probes
    probe_steps: int = 300


@dataclass(frozen=True)
class HiddenCache:
    states: torch.Tensor  # [N, L, hidden] bf16: the hidden state after every layer
    num_answer_positions: int  # how many of the N are summary (decode-like) positions


def training_sequences(
    ckpt: Checkpoint, examples: Sequence[SummaryExample], cfg: ExitTrainConfig
) -> list[tuple[list[int], int]]:
    """(token ids, index of the first answer token): the model's own prompt format with the
    reference summary as its answer, so cached positions look like the positions it decodes."""
    tok, fmt = ckpt.tokenizer, ckpt.prompt
    eos = ckpt.config.eos_token_id
    out = []
    for ex in examples:
        prompt = fmt.encode(
            tok, fmt.summary_request(ex.article[: cfg.max_article_chars], ex.dataset),
            ckpt.config.bos_token_id,
        )  # fmt: skip
        answer = tok.encode(ex.reference, add_special_tokens=False).ids
        out.append(([*prompt, *answer, *([eos] if eos is not None else [])], len(prompt)))
    return out


@torch.inference_mode()
def cache_hidden_states(
    model: LlamaModel,
    sequences: Sequence[tuple[list[int], int]],
    cfg: ExitTrainConfig,
    progress: Progress,
) -> HiddenCache:
    """Hidden states of every layer at the positions that predict answer tokens, plus a few
    random prompt positions, for each sequence (one at a time: no padding to waste)."""
    rng = np.random.default_rng(cfg.seed)
    answer, prompt = [], []
    for i, (ids, start) in enumerate(sequences):
        states = torch.stack(model.dense_hidden_states(torch.tensor([ids]))).squeeze(1)  # [L,T,d]
        keep = np.arange(start - 1, len(ids) - 1)  # position t predicts token t + 1
        extra = rng.choice(start - 1, size=min(cfg.prompt_positions, start - 1), replace=False)
        answer.append(states[:, keep].transpose(0, 1).to(torch.bfloat16))
        prompt.append(states[:, np.sort(extra)].transpose(0, 1).to(torch.bfloat16))
        progress("cache", i + 1, len(sequences), "hidden states")
    ans = torch.cat(answer)
    return HiddenCache(torch.cat([ans, *prompt]), len(ans))


@torch.inference_mode()
def distillation_vocab(model: LlamaModel, cache: HiddenCache, size: int) -> torch.Tensor:
    """Token ids the final layer ranks in its top 8 most often; every final argmax included."""
    final = F.linear(model.model.norm(cache.states[:, -1].float()), model.lm_head_weight())
    top = final.topk(8, dim=-1).indices  # [N, 8]
    must = top[:, 0].unique()
    counts = torch.bincount(top.flatten(), minlength=final.shape[-1]).float()
    counts[must] = float("inf")
    return counts.topk(min(size, final.shape[-1])).indices.sort().values


def init_adapters(model: LlamaModel, rank: int, generator: torch.Generator) -> ExitClassifiers:
    """Identity adapters (the logit lens): g_l = the final norm's gain, B_l = 0, A_l random so
    the first gradient reaches B_l (LoRA's initialisation)."""
    cfg = model.config
    heads = ExitClassifiers(cfg.num_hidden_layers, cfg.hidden_size, rank)
    with torch.no_grad():
        heads.norm_weight.copy_(model.model.norm.weight.expand_as(heads.norm_weight))
        heads.down.normal_(0.0, cfg.hidden_size**-0.5, generator=generator)
    return heads


def train_adapters(
    model: LlamaModel,
    cache: HiddenCache,
    vocab: torch.Tensor,
    cfg: ExitTrainConfig,
    progress: Progress,
) -> ExitClassifiers:
    gen = torch.Generator().manual_seed(cfg.seed)
    heads = init_adapters(model, cfg.adapter_rank, gen)
    params = [heads.norm_weight, heads.down, heads.up]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    w_sub = (
        model.lm_head_weight()[vocab.clone()].detach().clone()
    )  # [V', hidden]; clones: out of inference mode
    eps = model.config.rms_norm_eps
    num_exits = model.num_layers - 1
    n = cache.states.shape[0]
    for step in range(cfg.num_steps):
        idx = torch.randint(n, (min(cfg.batch_positions, n),), generator=gen)
        batch = cache.states[idx].float().clone()  # [B, L, hidden]; clone: leaves inference mode
        with torch.no_grad():
            teacher = F.linear(model.model.norm(batch[:, -1]), w_sub).log_softmax(-1)
        layers = torch.randperm(num_exits, generator=gen)[: cfg.layers_per_step]
        loss = torch.zeros(())
        for i in layers.tolist():  # layer i + 1
            student = F.linear(heads.normed(i + 1, batch[:, i], eps), w_sub).log_softmax(-1)
            loss = loss + F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        (loss / len(layers)).backward()
        opt.step()
        progress("adapters", step + 1, cfg.num_steps, f"KL {loss.item() / len(layers):.3f}")
    return heads.eval()


@torch.inference_mode()
def probe_data(
    model: LlamaModel, heads: ExitClassifiers | None, states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exit-normed states [L, N, hidden] and labels [L, N] (exit argmax == final argmax) over
    the full vocabulary, in chunks so the [L, chunk, vocab] logits stay small."""
    normed, labels = [], []
    for chunk in states.float().split(256):
        h = exit_norm_stack(model, heads, chunk.transpose(0, 1))  # [L, c, hidden]
        top = F.linear(h, model.lm_head_weight()).argmax(-1)  # [L, c]
        normed.append(h)
        labels.append((top == top[-1:]).float())
    return torch.cat(normed, dim=1), torch.cat(labels, dim=1)


def fit_probes(heads: ExitClassifiers, feats: torch.Tensor, labels: torch.Tensor, steps: int):
    """Logistic probes per layer, all layers at once: feats [L, N, hidden], labels [L, N]."""
    opt = torch.optim.Adam([heads.weight, heads.bias], lr=1e-2)
    for _ in range(steps):
        logit = torch.einsum("lnh,lh->ln", feats, heads.weight) + heads.bias[:, None]
        loss = F.binary_cross_entropy_with_logits(logit, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def train_exit_heads(
    ckpt: Checkpoint,
    examples: Sequence[SummaryExample],
    cfg: ExitTrainConfig,
    progress: Progress,
) -> tuple[ExitClassifiers, dict]:
    """Adapters, then probes on the adapted exits; returns them and the training facts."""
    model = ckpt.model
    for p in model.parameters():
        p.requires_grad_(False)
    cache = cache_hidden_states(model, training_sequences(ckpt, examples, cfg), cfg, progress)
    vocab = distillation_vocab(model, cache, cfg.vocab_subset)
    heads = train_adapters(model, cache, vocab, cfg, progress)
    pick = torch.randperm(cache.states.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    feats, labels = probe_data(model, heads, cache.states[pick[: cfg.probe_positions]])
    fit_probes(heads, feats.clone(), labels.clone(), cfg.probe_steps)
    facts = {
        "num_examples": len(examples),
        "num_cached_positions": int(cache.states.shape[0]),
        "num_answer_positions": cache.num_answer_positions,
        "distillation_vocab": int(len(vocab)),
        "train_agreement": labels.mean(dim=1).tolist(),  # per layer, adapted exits
    }
    return heads.eval(), facts
