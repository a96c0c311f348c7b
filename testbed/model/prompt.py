"""How a checkpoint turns text into prompt token ids: plain (BOS + text) or a chat template.

An instruct model such as SmolLM2 expects its chat template; its BOS token is the template's own
first ``<|im_start|>``, so the template is applied to token ids here and no BOS is prepended
(a chat-templated string run through a BOS-prepending encoder would carry a doubled BOS). The
format lives in the checkpoint as ``prompt_format.json``; without one the format is plain, which
is what the built-in model was trained on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer

from testbed.errors import CheckpointError

PROMPT_FORMAT_FILE = "prompt_format.json"
FORMAT_KINDS = ("plain", "chatml")
# sentences asked for per data set: CNN/DM references are three highlights, XSum's one sentence
SUMMARY_SENTENCES = {"cnndm": 3, "xsum": 1, "scitldr": 1}


@dataclass(frozen=True)
class PromptFormat:
    kind: str = "plain"  # plain: BOS + text | chatml: <|im_start|>role\n...<|im_end|>\n turns
    system: str | None = None  # chatml: the system turn the template adds when none is given

    def __post_init__(self) -> None:
        if self.kind not in FORMAT_KINDS:
            raise CheckpointError(
                f"unknown prompt format {self.kind!r} (known: {', '.join(FORMAT_KINDS)})"
            )

    def text(self, message: str) -> str:
        """The prompt string without BOS (plain) or with the whole chat template (chatml)."""
        if self.kind == "plain":
            return message
        turns = f"<|im_start|>system\n{self.system}<|im_end|>\n" if self.system else ""
        return f"{turns}<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"

    def encode(self, tokenizer: Tokenizer, message: str, bos_token_id: int | None) -> list[int]:
        ids = tokenizer.encode(self.text(message), add_special_tokens=False).ids
        if self.kind == "plain" and bos_token_id is not None:
            return [bos_token_id, *ids]
        return ids

    def summary_request(self, article: str, dataset: str = "cnndm") -> str:
        """The message asking for a summary: the built-in model's trained suffix, or an
        instruction for a chat model (stated in the README with its figures)."""
        if self.kind == "plain":
            return f"{article}\nSummary:"
        n = SUMMARY_SENTENCES.get(dataset, 3)
        what = "one sentence" if n == 1 else f"{n} sentences"
        return f"Summarize the following article in {what}.\n\n{article}"


def read_prompt_format(path: Path) -> PromptFormat:
    file = Path(path) / PROMPT_FORMAT_FILE
    if not file.is_file():
        return PromptFormat()
    try:
        raw = json.loads(file.read_text())
        return PromptFormat(**raw)
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{file} is not a valid prompt format: {exc}") from exc


def write_prompt_format(path: Path, fmt: PromptFormat) -> None:
    (Path(path) / PROMPT_FORMAT_FILE).write_text(json.dumps(asdict(fmt), indent=2) + "\n")
