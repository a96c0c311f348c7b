"""SmolLM2-135M-Instruct, the testbed's reference pretrained model. These tests need it
prepared (`eetb model prepare smollm2-135m`; CI does it once into the repository's .cache/) and
skip, saying so, when it is not."""

from __future__ import annotations

import pytest
import torch

from testbed.builtin_model import resolve_model_dir
from testbed.capture_records import EngineConfig
from testbed.cli import main as cli_main
from testbed.core.policy_set import PolicyConfig
from testbed.engine.engine import LLMEngine
from testbed.engine.sampler import SamplingParams
from testbed.errors import CheckpointError, ConfigError
from testbed.model.checkpoint import load_checkpoint

pytestmark = pytest.mark.realmodel
NAME = "smollm2-135m"


@pytest.fixture(scope="module")
def model_dir():
    try:
        return resolve_model_dir(NAME)
    except CheckpointError as exc:
        pytest.skip(f"{exc}")


@pytest.fixture(scope="module")
def stock(model_dir):
    """The backbone alone: exits through its own final norm and LM head (logit lens)."""
    return load_checkpoint(model_dir, exit_heads=False)


@pytest.fixture(scope="module")
def hf(model_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(model_dir)


def test_logits_equal_transformers(stock, hf):
    ids = torch.tensor([stock.tokenizer.encode("Early exit saves layers when").ids])
    with torch.inference_mode():
        diff = (stock.model(ids) - hf[0](ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_chat_prompt_is_transformers_template_with_one_bos(stock, hf):
    message = "Summarize: the cat sat on the mat."
    ours = LLMEngine(stock).encode(message)
    theirs = hf[1].apply_chat_template([{"role": "user", "content": message}],
                                       add_generation_prompt=True, tokenize=True)  # fmt: skip
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs  # a BatchEncoding
    assert ours == list(theirs)
    assert ours.count(stock.config.bos_token_id) == 3  # one per turn: system, user, assistant


def test_engine_full_depth_matches_transformers_greedy(stock, hf):
    prompts = ["What is the capital of France?", "Write one sentence about rivers."]
    engine = LLMEngine(stock)
    outs = engine.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([engine.encode(prompt)])
        ref = hf[0].generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :].tolist()
        assert len(ref) >= 4 and out.token_ids[: len(ref)] == ref  # transformers stops at EOS


def test_stock_checkpoint_exits_layerskip_style(stock):
    params = SamplingParams(max_tokens=12)
    for rule, lam in (("softmax", 0.2), ("hidden", 0.9)):
        policy = PolicyConfig(batching="shrink", exit_rule=rule, threshold=lam, min_exit_layer=20)
        out = LLMEngine(stock, EngineConfig(policy=policy)).generate(["Name a colour."], params)[0]
        assert min(out.exit_layers[1:]) >= 20 and len(out.token_ids) > 0
    with pytest.raises(ConfigError, match="exit_heads"):
        LLMEngine(
            stock, EngineConfig(policy=PolicyConfig(batching="shrink", exit_rule="classifier"))
        )


def test_shipped_adapters_load_and_run_the_classifier(model_dir):
    ckpt = load_checkpoint(model_dir)
    if ckpt.exit_heads is None:
        pytest.skip("no exit_heads.safetensors shipped for this model yet (eetb train-exits)")
    assert ckpt.exit_heads.adapter_rank is not None
    policy = PolicyConfig(
        batching="shrink", exit_rule="classifier", threshold=0.5, min_exit_layer=15
    )
    out = LLMEngine(ckpt, EngineConfig(policy=policy)).generate(["Name a colour."],
                                                               SamplingParams(max_tokens=12))[0]  # fmt: skip
    assert len(out.token_ids) > 0 and min(out.exit_layers[1:]) >= 15


def test_prompt_beyond_the_context_is_one_line(model_dir, capsys):
    long_prompt = "word " * 2100
    code = cli_main(["generate", "--model", NAME, "--prompt", long_prompt, "--max-tokens", "4"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "max_model_len" in err
