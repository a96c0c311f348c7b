"""What may enter the scheduler: its limits and the checks a new request must pass.

Validation raises before anything is queued, so a rejected request leaves the queues untouched.
"""

from dataclasses import dataclass

from testbed.core.block_manager import BlockManager
from testbed.core.errors import (
    InvalidRequestError,
    RequestNeverFitsError,
    RequestTooLongError,
    SchedulerConfigError,
)
from testbed.core.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one scheduler iteration."""

    max_num_seqs: int = 64  # sequences admitted at once (running + parked)
    max_num_batched_tokens: int = 2048  # tokens fed per step
    max_model_len: int = (
        2048  # prompt + max_tokens of any request (engines cap it at the model's context)
    )
    enable_chunked_prefill: bool = True  # split long prefills across steps

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise SchedulerConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        # Every admitted sequence's decode row must fit one step, or some would starve.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise SchedulerConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})"
            )
        # Without chunking a whole (re)prefill must fit one step's budget.
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise SchedulerConfigError(
                f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens})"
                f" must be >= max_model_len ({self.max_model_len})"
            )


def validate_request(seq: Sequence, config: SchedulerConfig, block_manager: BlockManager) -> None:
    """Raise if seq is malformed or can never be served under config and this cache size."""
    if seq.max_tokens <= 0:
        raise InvalidRequestError(f"seq {seq.seq_id}: max_tokens must be > 0, got {seq.max_tokens}")
    is_fresh = seq.status is SequenceStatus.WAITING and not seq.output_token_ids
    if not is_fresh or seq.num_computed_tokens or seq.block_table:
        raise InvalidRequestError(f"seq {seq.seq_id}: already scheduled before")
    if seq.num_prompt_tokens == 0:
        raise RequestTooLongError(f"seq {seq.seq_id}: empty prompt")
    max_len = seq.num_prompt_tokens + seq.max_tokens
    if max_len > config.max_model_len:
        raise RequestTooLongError(
            f"seq {seq.seq_id}: prompt {seq.num_prompt_tokens} + max_tokens {seq.max_tokens}"
            f" exceeds max_model_len {config.max_model_len}"
        )
    # Conservative by one position (the last sampled token is never fed): the plain question
    # "does the longest possible sequence fit in the whole cache".
    num_blocks_needed = block_manager.blocks_needed(max_len)
    if num_blocks_needed > block_manager.num_blocks:
        raise RequestNeverFitsError(
            f"seq {seq.seq_id}: needs {num_blocks_needed} KV blocks,"
            f" the cache has {block_manager.num_blocks}"
        )
