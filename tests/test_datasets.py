"""Summarisation loaders on small files in the public formats, and on the real data when present."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from testbed.datasets import (
    DATA_DIR_ENV,
    FILES,
    NUM_EVAL_PER_SET,
    load_summaries,
    load_text,
    resolve_data_dir,
    strip_helm_wrapper,
)
from testbed.errors import DataError

NUM_HELM_ROWS = NUM_EVAL_PER_SET + 40  # enough for an eval part and a non-empty train part


def _helm_row(article: str, summary: str, sentences: str = "3 sentences") -> dict:
    wrapped = f"###\nArticle: {article}\n\nSummarize the above article in {sentences}."
    return {"article": wrapped, "summary_gt": summary, "temperature": 0.3, "max_tokens": 128}


def _write_jsonl(file: Path, rows: list[dict]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _all_splits(name: str, data_dir: Path) -> list:
    return load_summaries(name, "train", data_dir) + load_summaries(name, "eval", data_dir)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    cnndm = [
        _helm_row(f"Article {i} says things.", f"Line one {i}.\nLine two {i}.")
        for i in range(NUM_HELM_ROWS)
    ]
    cnndm.insert(5, cnndm[3])  # the real CNN/DM file repeats one article
    _write_jsonl(tmp_path / FILES["cnndm"], cnndm)
    xsum = [_helm_row(f"Story {i}.", f"summary {i}", "1 sentence") for i in range(NUM_HELM_ROWS)]
    _write_jsonl(tmp_path / FILES["xsum"], xsum)
    for split in ("train", "test"):
        rows = [
            {
                "source": [f"{split} sentence {i}a.", f"Sentence {i}b."],
                "target": [f"tldr {i}", "alt"],
                "title": "t",
                "paper_id": f"{split}-{i}",
            }
            for i in range(6)
        ]
        _write_jsonl(tmp_path / FILES["scitldr"].format(split=split), rows)
    return tmp_path


def test_helm_wrapper_stripped_and_reference_kept(data_dir):
    examples = _all_splits("cnndm", data_dir)
    by_article = {ex.article: ex for ex in examples}
    ex = by_article["Article 7 says things."]
    assert ex.reference == "Line one 7. Line two 7."
    assert ex.dataset == "cnndm"
    assert all("###" not in e.article and "Summarize the above" not in e.article for e in examples)


def test_strip_helm_wrapper_one_sentence_and_plain_text():
    wrapped = "###\nArticle: A line.\nAnother line.\n\nSummarize the above article in 1 sentence."
    assert strip_helm_wrapper(wrapped) == "A line.\nAnother line."
    assert strip_helm_wrapper("  just text  ") == "just text"


def test_repeated_article_is_deduplicated(data_dir):
    examples = _all_splits("cnndm", data_dir)
    articles = [ex.article for ex in examples]
    assert len(articles) == len(set(articles)) == NUM_HELM_ROWS


@pytest.mark.parametrize("name", ["cnndm", "xsum"])
def test_seeded_split_is_fixed_and_disjoint(data_dir, name):
    train = load_summaries(name, "train", data_dir)
    evals = load_summaries(name, "eval", data_dir)
    assert len(evals) == NUM_EVAL_PER_SET
    assert len(train) == NUM_HELM_ROWS - NUM_EVAL_PER_SET
    assert not {ex.article for ex in train} & {ex.article for ex in evals}
    assert load_summaries(name, "eval", data_dir) == evals
    assert load_summaries(name, "train", data_dir) == train


def test_split_is_not_just_file_order(data_dir):
    evals = load_summaries("xsum", "eval", data_dir)
    assert [ex.article for ex in evals] != [f"Story {i}." for i in range(NUM_EVAL_PER_SET)]


def test_scitldr_joins_source_and_takes_first_target(data_dir):
    train = load_summaries("scitldr", "train", data_dir)
    evals = load_summaries("scitldr", "eval", data_dir)
    assert train[0].article == "train sentence 0a. Sentence 0b."
    assert train[0].reference == "tldr 0"
    assert train[0].example_id == "train-0"
    assert {ex.example_id for ex in evals} == {f"test-{i}" for i in range(6)}


def test_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(data_dir))
    assert resolve_data_dir(None) == data_dir
    assert load_summaries("scitldr", "train")[0].reference == "tldr 0"


def test_missing_file_names_itself_and_the_option(tmp_path):
    with pytest.raises(DataError) as info:
        load_summaries("cnndm", "train", tmp_path)
    message = str(info.value)
    assert "cnn_dailymail_0shot.jsonl" in message
    assert "--data-dir" in message and DATA_DIR_ENV in message


def test_missing_directory_names_the_option(tmp_path):
    with pytest.raises(DataError, match=f"does not exist.*--data-dir.*{DATA_DIR_ENV}"):
        load_summaries("cnndm", "train", tmp_path / "absent")


def test_no_data_dir_and_env_unset(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DataError, match=f"--data-dir.*{DATA_DIR_ENV}"):
        load_summaries("cnndm", "train")


def test_empty_file(data_dir):
    (data_dir / FILES["xsum"]).write_text("\n\n")
    with pytest.raises(DataError, match="xsum_0shot.jsonl is empty"):
        load_summaries("xsum", "eval", data_dir)


def test_invalid_json_line_reports_file_and_line(data_dir):
    file = data_dir / FILES["xsum"]
    lines = file.read_text().splitlines()
    lines[2] = '{"article": "unterminated'
    file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"xsum_0shot\.jsonl:3: not valid JSON"):
        load_summaries("xsum", "train", data_dir)


def test_row_without_fields(data_dir):
    _write_jsonl(data_dir / FILES["xsum"], [{"text": "no article here"}])
    with pytest.raises(DataError, match="row 1 lacks 'article' or 'summary_gt'"):
        load_summaries("xsum", "train", data_dir)


def test_too_few_items_leaves_train_split_empty(tmp_path):
    _write_jsonl(tmp_path / FILES["xsum"], [_helm_row(f"S {i}.", "s") for i in range(10)])
    with pytest.raises(DataError, match="train split is empty"):
        load_summaries("xsum", "train", tmp_path)


def test_unknown_set_and_split(data_dir):
    with pytest.raises(DataError, match="unknown data set"):
        load_summaries("wikitext", "train", data_dir)
    with pytest.raises(DataError, match="unknown split"):
        load_summaries("cnndm", "test", data_dir)


def test_unreadable_directory(data_dir):
    os.chmod(data_dir, 0)
    try:
        if os.access(data_dir, os.R_OK | os.X_OK):
            pytest.skip("running as a user who can read a chmod 000 directory (root)")
        with pytest.raises(DataError, match="not readable"):
            load_summaries("cnndm", "train", data_dir)
    finally:
        os.chmod(data_dir, 0o755)


def test_unreadable_directory_message(data_dir, monkeypatch):
    # root reads a chmod 000 directory, so also check the message with access denied directly
    monkeypatch.setattr("testbed.datasets.os.access", lambda path, mode: False)
    with pytest.raises(DataError, match=f"data directory {data_dir} is not readable"):
        load_summaries("cnndm", "train", data_dir)


def test_load_text(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n")
    assert load_text(tmp_path / "a.txt") == "hello\n"
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="is empty"):
        load_text(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="not found"):
        load_text(tmp_path / "missing.txt")


@pytest.mark.skipif(not os.environ.get(DATA_DIR_ENV), reason=f"{DATA_DIR_ENV} is not set")
def test_real_cnndm_eval_split_is_held_out():
    evals = load_summaries("cnndm", "eval")
    train = load_summaries("cnndm", "train")
    assert len(evals) == 200
    assert not {ex.article for ex in evals} & {ex.article for ex in train}
    assert all(ex.article and ex.reference for ex in evals)
