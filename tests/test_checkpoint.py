"""HF-format checkpoint directories: round trips, transformers compatibility, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from testbed.errors import CheckpointError
from testbed.model.checkpoint import (
    EXIT_HEADS_FILE,
    WEIGHTS_FILE,
    checkpoint_hash,
    load_checkpoint,
    load_tokenizer,
)
from testbed.model.checkpoint import save_checkpoint as save
from testbed.model.config import LlamaConfig
from testbed.model.llama import ExitClassifiers, LlamaModel
from testbed.model.train import train_tokenizer

TEXTS = ["the cat sat on the mat.", "a dog ran in the park!", "Summary: cats and dogs."] * 4


def _config(**overrides) -> LlamaConfig:
    fields = dict(
        vocab_size=300, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=5000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaConfig(**(fields | overrides))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture
def model() -> LlamaModel:
    torch.manual_seed(0)
    return LlamaModel(_config()).eval()


@pytest.fixture
def heads() -> ExitClassifiers:
    heads = ExitClassifiers(3, 24)
    with torch.no_grad():
        heads.weight.copy_(torch.randn(3, 24, generator=torch.Generator().manual_seed(1)))
        heads.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return heads


@pytest.fixture
def ckpt_dir(tmp_path, model, tokenizer, heads) -> Path:
    return save(tmp_path / "ckpt", model, tokenizer=tokenizer, exit_heads=heads)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(2))


# --- round trips ---------------------------------------------------------------------------


def test_weights_round_trip(ckpt_dir, model):
    loaded = load_checkpoint(ckpt_dir)
    # head_dim=None is written out resolved, so compare what config.json says
    assert loaded.config.to_hf_dict() == model.config.to_hf_dict()
    expected = model.state_dict()
    got = loaded.model.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_tied_head_round_trip(tmp_path):
    torch.manual_seed(3)
    model = LlamaModel(_config(tie_word_embeddings=True)).eval()
    loaded = load_checkpoint(save(tmp_path, model), require_tokenizer=False).model
    ids = _ids(300)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)


def test_exit_heads_round_trip(ckpt_dir, heads):
    loaded = load_checkpoint(ckpt_dir)
    assert loaded.exit_heads is not None
    assert torch.equal(loaded.exit_heads.weight, heads.weight)
    assert torch.equal(loaded.exit_heads.bias, heads.bias)


def test_no_exit_heads_file_gives_none(tmp_path, model, tokenizer):
    path = save(tmp_path, model, tokenizer=tokenizer)
    assert not (path / EXIT_HEADS_FILE).exists()
    assert load_checkpoint(path).exit_heads is None


def test_tokenizer_round_trip(ckpt_dir, tokenizer):
    loaded = load_checkpoint(ckpt_dir).tokenizer
    assert loaded is not None
    text = "the dog sat in the park."
    assert loaded.encode(text).ids == tokenizer.encode(text).ids
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.decode(tokenizer.encode(text).ids) == text


def test_hash_is_stable_and_sees_weights(ckpt_dir, tmp_path, model):
    assert checkpoint_hash(ckpt_dir) == checkpoint_hash(ckpt_dir)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    assert checkpoint_hash(save(tmp_path / "other", model)) != checkpoint_hash(ckpt_dir)


@torch.no_grad()
def test_transformers_loads_our_directory(ckpt_dir, model):
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt_dir, torch_dtype=torch.float32).eval()
    ids = _ids(300)
    torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), atol=1e-4, rtol=0)


# --- bad input: each one raises CheckpointError with a message naming the problem ------------


def _rewrite_config(path: Path, **changes) -> None:
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(raw | changes))


def _expect(path: Path, match: str, **kwargs) -> None:
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, **kwargs)


def test_missing_directory(tmp_path):
    _expect(tmp_path / "nope", "directory not found")


def test_missing_config(ckpt_dir):
    (ckpt_dir / "config.json").unlink()
    _expect(ckpt_dir, "config.json is missing")


def test_invalid_json_config(ckpt_dir):
    (ckpt_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    _expect(ckpt_dir, "not valid JSON")


def test_unknown_architecture(ckpt_dir):
    _rewrite_config(ckpt_dir, architectures=["GPT2LMHeadModel"])
    _expect(ckpt_dir, "unsupported architecture.*GPT2LMHeadModel")


def test_corrupt_safetensors(ckpt_dir):
    (ckpt_dir / WEIGHTS_FILE).write_bytes(b"\x00garbage, not a safetensors file" * 10)
    _expect(ckpt_dir, "corrupt or truncated")


def test_truncated_safetensors(ckpt_dir):
    file = ckpt_dir / WEIGHTS_FILE
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    _expect(ckpt_dir, "corrupt or truncated")


def test_corrupt_exit_heads(ckpt_dir):
    (ckpt_dir / EXIT_HEADS_FILE).write_bytes(b"garbage")
    _expect(ckpt_dir, "exit_heads.safetensors is corrupt")


def test_wrong_tensor_shape(ckpt_dir, model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = "model.layers.1.mlp.up_proj.weight"
    state[name] = torch.zeros(41, 24)  # config.json says intermediate_size 40
    save_file(state, str(ckpt_dir / WEIGHTS_FILE))
    _expect(ckpt_dir, r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(41, 24\)")


def test_config_disagreeing_with_weights(ckpt_dir):
    _rewrite_config(ckpt_dir, hidden_size=32, head_dim=8)
    _expect(ckpt_dir, "has shape")


def test_missing_tensor(ckpt_dir, model):
    state = {k: v for k, v in model.state_dict().items() if k != "model.norm.weight"}
    save_file(state, str(ckpt_dir / WEIGHTS_FILE))
    _expect(ckpt_dir, r"missing tensor 'model\.norm\.weight'")


def test_unexpected_tensor(ckpt_dir, model):
    state = model.state_dict() | {"model.extra.weight": torch.zeros(2)}
    save_file(state, str(ckpt_dir / WEIGHTS_FILE))
    _expect(ckpt_dir, "unexpected tensor 'model.extra.weight'")


def test_pickle_only_directory_is_refused(ckpt_dir, model):
    (ckpt_dir / WEIGHTS_FILE).unlink()
    (ckpt_dir / EXIT_HEADS_FILE).unlink()
    torch.save(model.state_dict(), ckpt_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle") as info:
        load_checkpoint(ckpt_dir)
    assert "safetensors" in str(info.value)
    assert "pytorch_model.bin" in str(info.value)


def test_no_weights_at_all(ckpt_dir):
    (ckpt_dir / WEIGHTS_FILE).unlink()
    _expect(ckpt_dir, r"no \*\.safetensors weight file")


def test_missing_tokenizer_when_required(ckpt_dir):
    (ckpt_dir / "tokenizer.json").unlink()
    _expect(ckpt_dir, "tokenizer.json is missing")
    assert load_checkpoint(ckpt_dir, require_tokenizer=False).tokenizer is None


def test_corrupt_tokenizer(ckpt_dir):
    (ckpt_dir / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3')
    _expect(ckpt_dir, "not a valid tokenizer")
    with pytest.raises(CheckpointError, match="not a valid tokenizer"):
        load_tokenizer(ckpt_dir)


def test_corrupt_tokenizer_is_reported_even_when_optional(ckpt_dir):
    # a tokenizer that is present but broken is never silently dropped
    (ckpt_dir / "tokenizer.json").write_text("not json")
    _expect(ckpt_dir, "not a valid tokenizer", require_tokenizer=False)


def test_checkpoint_error_is_one_line(ckpt_dir):
    (ckpt_dir / WEIGHTS_FILE).write_bytes(b"junk")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt_dir)
    assert "\n" not in str(info.value)
