"""Errors raised by policy construction and lookup.

Both are ValueErrors so that a CLI can turn any of them into one clear line and exit code 2.
"""

from __future__ import annotations


class PolicyConfigError(ValueError):
    """A policy was configured with parameters it cannot run with, or could not be built."""


class UnknownPolicyError(PolicyConfigError):
    """A policy kind or name is not known to the registry; the message lists the known ones."""
