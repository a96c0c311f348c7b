"""When parked rebatch rows resume: the resume policy, asked about the parked queue."""

from collections.abc import Sequence as SequenceABC
from typing import Protocol

from testbed.core.sequence import Sequence


class ResumePolicy(Protocol):
    """Decides when parked rebatch rows resume together as one deep batch."""

    def should_resume(self, *, num_parked: int, oldest_wait_steps: int) -> bool: ...


def resume_delay(
    policy: ResumePolicy | None, parked: SequenceABC[Sequence], step_id: int, limit: int
) -> int:
    """Steps from step_id to the first whose schedule() resumes ``parked`` (not empty), if
    no row parks or resumes meanwhile; limit when that is limit steps or more. Without a
    policy they resume at once."""
    if policy is None:
        return 0
    oldest_since = min(seq.parked_since_step for seq in parked if seq.parked_since_step is not None)
    first_wait, num_parked = step_id - oldest_since, len(parked)
    return next(
        (n for n in range(limit)
         if policy.should_resume(num_parked=num_parked, oldest_wait_steps=first_wait + n)),
        limit,
    )  # fmt: skip
