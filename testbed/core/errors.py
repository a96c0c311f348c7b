"""Errors raised by the shared scheduling core.

Every error is a `CoreError`, so callers (engine, simulator, CLI) can catch the family at one place;
the ones caused by a bad request are also `ValueError`s, because that is what they are.
"""


class CoreError(Exception):
    """Base class of every error raised by `testbed.core`."""


class RequestTooLongError(CoreError, ValueError):
    """The prompt is empty, or prompt + max_tokens exceeds the scheduler's max_model_len."""


class RequestNeverFitsError(CoreError):
    """The request needs more KV blocks than the whole cache has; it is rejected, never retried."""


class InvalidRequestError(CoreError, ValueError):
    """The request is malformed (max_tokens <= 0, reused or decreasing seq_id, non-fresh state)."""


class OutOfBlocksError(CoreError):
    """An allocation asked for more free KV blocks than remain (check can_allocate first)."""


class SchedulerConfigError(CoreError, ValueError):
    """A scheduler setting is out of range or inconsistent with another setting."""


class SchedulerStateError(CoreError):
    """schedule()/update() were called out of order (a plan must be updated before the next one)."""
