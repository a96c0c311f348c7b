"""Summarisation data sets (CNN/DM, XSum, SciTLDR) and plain text from a data directory.

The directory comes from ``--data-dir`` or ``EETB_DATA_DIR``; files keep the names and formats of
their public sources, so a user who downloads the originals gets the same behaviour. CNN/DM and
XSum ship only as 1,000 HELM test items: a fixed, seeded split holds out the evaluation part.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from testbed.errors import DataError

DATA_DIR_ENV = "EETB_DATA_DIR"
SPLIT_SEED = 20240729  # fixed forever: changing it would leak evaluation items into training
NUM_EVAL_PER_SET = 200
# HELM wraps each article as "###\nArticle: ...\n\nSummarize the above article in N sentence(s)."
_HELM_WRAPPER = re.compile(
    r"^\s*###\s*\nArticle:\s*(?P<article>.*?)\s*\n\s*Summarize the above article in [^\n]*\s*$",
    re.DOTALL,
)
FILES = {
    "cnndm": "helm_cnndm_xsum_0shot/cnn_dailymail_0shot.jsonl",
    "xsum": "helm_cnndm_xsum_0shot/xsum_0shot.jsonl",
    "scitldr": "scitldr_abstract_tldr/{split}.jsonl",
}
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class SummaryExample:
    dataset: str  # cnndm | xsum | scitldr
    example_id: str  # stable within its data set
    article: str  # the source text, without any prompt wrapper
    reference: str  # the first reference summary


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    raw = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not raw:
        raise DataError(f"no data directory: pass --data-dir or set {DATA_DIR_ENV}")
    path = Path(raw)
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist (set --data-dir or {DATA_DIR_ENV})")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DataError(f"data directory {path} is not readable")
    return path


def _read_jsonl(file: Path) -> list[dict]:
    if not file.is_file():
        raise DataError(f"{file} not found (set --data-dir or {DATA_DIR_ENV} to the data folder)")
    rows = []
    line_no = 0
    try:
        with file.open(encoding="utf-8") as fh:
            for line in fh:
                line_no += 1
                if line.strip():
                    rows.append(json.loads(line))
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}:{line_no}: not valid JSON ({exc.msg})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{file}: cannot be read ({exc})") from exc
    if not rows:
        raise DataError(f"{file} is empty")
    return rows


def strip_helm_wrapper(text: str) -> str:
    match = _HELM_WRAPPER.match(text)
    return match.group("article") if match else text.strip()


def _helm_examples(name: str, file: Path) -> list[SummaryExample]:
    out, seen = [], set()
    for i, row in enumerate(_read_jsonl(file)):
        if "article" not in row or "summary_gt" not in row:
            raise DataError(f"{file}: row {i + 1} lacks 'article' or 'summary_gt'")
        article = strip_helm_wrapper(row["article"])
        if article in seen:  # the CNN/DM file repeats one article
            continue
        seen.add(article)
        reference = " ".join(s.strip() for s in row["summary_gt"].split("\n") if s.strip())
        out.append(SummaryExample(name, str(i), article, reference))
    return out


def _scitldr_examples(file: Path) -> list[SummaryExample]:
    out = []
    for i, row in enumerate(_read_jsonl(file)):
        if not row.get("source") or not row.get("target"):
            raise DataError(f"{file}: row {i + 1} lacks 'source' or 'target'")
        paper_id = str(row.get("paper_id", i))
        out.append(SummaryExample("scitldr", paper_id, " ".join(row["source"]), row["target"][0]))
    return out


def _seeded_split(examples: list[SummaryExample], split: str) -> list[SummaryExample]:
    order = np.random.default_rng(SPLIT_SEED).permutation(len(examples))
    held_out = set(order[:NUM_EVAL_PER_SET].tolist())
    keep = held_out if split == "eval" else set(range(len(examples))) - held_out
    return [ex for i, ex in enumerate(examples) if i in keep]


def load_summaries(
    name: str, split: str, data_dir: str | Path | None = None
) -> list[SummaryExample]:
    """Examples of one data set and split ('train' or 'eval'), in file order."""
    if name not in FILES:
        raise DataError(f"unknown data set {name!r} (known: {', '.join(FILES)})")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    root = resolve_data_dir(data_dir)
    if name == "scitldr":  # SciTLDR has its own split; its test part is our evaluation part
        return _scitldr_examples(
            root / FILES[name].format(split="train" if split == "train" else "test")
        )
    examples = _seeded_split(_helm_examples(name, root / FILES[name]), split)
    if not examples:
        raise DataError(f"{name} {split} split is empty")
    return examples


def load_text(file: str | Path) -> str:
    path = Path(file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"{path} not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from exc
    if not text.strip():
        raise DataError(f"{path} is empty")
    return text
