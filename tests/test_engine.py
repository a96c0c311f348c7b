"""Native engine: exactness against transformers and against a from-scratch reference."""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers

from testbed.builtin_model import resolve_model_dir
from testbed.capture_records import EngineConfig
from testbed.core import SchedulerConfig
from testbed.core.policy_set import PolicyConfig
from testbed.engine.engine import LLMEngine
from testbed.engine.sampler import SamplingParams
from testbed.model.checkpoint import load_checkpoint
from tests.engine_helpers import TINY, prompts, reference_generate, tiny_checkpoint

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _engine(ckpt, *, max_num_seqs=8, budget=256, kv_mb=4.0, block_size=4, **policy):
    cfg = EngineConfig(
        policy=PolicyConfig(**policy),
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=128
        ),
        block_size=block_size,
        kv_cache_mb=kv_mb,
    )
    return LLMEngine(ckpt, cfg)


def test_full_matches_transformers_under_continuous_batching(ckpt):
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt.path).eval()
    ps = prompts(7, seed=3)
    # 3 sequences at a time and a 16-token budget: chunked prefill, requests joining mid-run
    outs = _engine(ckpt, max_num_seqs=3, budget=16).generate(ps, GREEDY)
    for p, out in zip(ps, outs, strict=True):
        expected = hf.generate(
            torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )[0, len(p):].tolist()  # fmt: skip
        assert out.token_ids == expected
        assert out.exit_layers == [TINY.num_hidden_layers] * 12


POLICIES = {
    "full": (),
    "consensus": (),
    "quorum": (("fraction", 0.5),),
    "shrink": (),
    "rebatch": (("park_below_fraction", 0.9), ("min_deep_rows", 2)),
}


@pytest.mark.parametrize(
    "batching,fill", list(itertools.product(POLICIES, ["copy", "lazy", "recompute", "skip"]))
)
def test_unreachable_threshold_equals_full(ckpt, batching, fill):
    ps = prompts(6, seed=4)
    full = _engine(ckpt).generate(ps, GREEDY)
    outs = _engine(
        ckpt, batching=batching, batching_params=POLICIES[batching], exit_rule="hidden",
        threshold=1.0, kv_fill=fill,
    ).generate(ps, GREEDY)  # fmt: skip
    assert [o.token_ids for o in outs] == [o.token_ids for o in full]
    assert all(e == TINY.num_hidden_layers for o in outs for e in o.exit_layers)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_consensus_copy_matches_reference(ckpt, batch_size):
    ps = prompts(batch_size, seed=5)
    ref = reference_generate(ckpt.model, ps, 10, threshold=0.9, batching="consensus")
    outs = _engine(ckpt, batching="consensus", exit_rule="hidden", threshold=0.9).generate(
        ps, SamplingParams(max_tokens=10, ignore_eos=True)
    )
    assert [(o.token_ids, o.exit_layers) for o in outs] == ref
    assert any(e < TINY.num_hidden_layers for _, exits in ref for e in exits), "nothing exited"


def test_consensus_equals_shrink_for_one_sequence(ckpt):
    ps = prompts(1, seed=6)
    runs = [
        _engine(ckpt, batching=b, exit_rule="hidden", threshold=0.9).generate(ps, GREEDY)[0]
        for b in ("consensus", "shrink")
    ]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].exit_layers == runs[1].exit_layers


@pytest.mark.parametrize("fill", ["copy", "skip"])
def test_shrink_fill_matches_reference(ckpt, fill):
    ps = prompts(4, seed=7)
    ref = reference_generate(ckpt.model, ps, 10, threshold=0.9, batching="shrink", fill=fill)
    outs = _engine(ckpt, batching="shrink", exit_rule="hidden", threshold=0.9, kv_fill=fill)
    got = outs.generate(ps, SamplingParams(max_tokens=10, ignore_eos=True))
    assert [(o.token_ids, o.exit_layers) for o in got] == ref


def test_copy_and_skip_differ(ckpt):
    """copy lets later tokens attend to K/V computed from the exit state; skip leaves them out."""
    ps = prompts(4, seed=7)
    results = {}
    for fill in ("copy", "skip"):
        eng = _engine(ckpt, batching="shrink", exit_rule="hidden", threshold=0.9, kv_fill=fill)
        out = eng.generate(ps, SamplingParams(max_tokens=10, ignore_eos=True))
        results[fill] = [(o.token_ids, o.exit_layers) for o in out]
        # the cells of skipped layers are readable after copy and masked out after skip
        num_invalid = int((~eng.runner.cache.is_valid[-1]).sum()) - int(
            (~eng.runner.cache.is_valid[0]).sum()
        )
        results[fill + "_invalid"] = num_invalid
    assert results["copy"] != results["skip"]
    assert results["copy_invalid"] == 0 and results["skip_invalid"] > 0


def test_full_matches_transformers_on_builtin_checkpoint():
    ckpt = load_checkpoint(resolve_model_dir("builtin"))
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt.path).eval()
    texts = ["The court said on Tuesday that", "Scientists have found a new", "A man"]
    engine = LLMEngine(ckpt, EngineConfig(scheduler=SchedulerConfig(max_num_seqs=2)))
    outs = engine.generate(texts, SamplingParams(max_tokens=16, ignore_eos=True))
    for out in outs:
        expected = hf.generate(
            torch.tensor([out.prompt_token_ids]), max_new_tokens=16, min_new_tokens=16,
            do_sample=False, pad_token_id=0,
        )[0, len(out.prompt_token_ids):].tolist()  # fmt: skip
        assert out.token_ids == expected
