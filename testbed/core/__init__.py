"""Scheduling core shared by the native engine and the simulator (numpy and stdlib only)."""

from testbed.core.admission import SchedulerConfig, validate_request
from testbed.core.block_manager import BlockManager, slots_for_positions
from testbed.core.errors import (
    CoreError,
    InvalidRequestError,
    OutOfBlocksError,
    RequestNeverFitsError,
    RequestTooLongError,
    SchedulerConfigError,
    SchedulerStateError,
)
from testbed.core.scheduler import ResumePolicy, Scheduler
from testbed.core.sequence import FinishReason, Sequence, SequenceStatus
from testbed.core.step import RowPlan, RowResult, StepPlan, StepResult

__all__ = [
    "BlockManager",
    "CoreError",
    "FinishReason",
    "InvalidRequestError",
    "OutOfBlocksError",
    "RequestNeverFitsError",
    "RequestTooLongError",
    "ResumePolicy",
    "RowPlan",
    "RowResult",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerConfigError",
    "SchedulerStateError",
    "Sequence",
    "SequenceStatus",
    "StepPlan",
    "StepResult",
    "slots_for_positions",
    "validate_request",
]
