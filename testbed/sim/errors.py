"""Errors of the simulator."""

from __future__ import annotations

from testbed.errors import EetbError


class SimulationError(EetbError):
    """A simulation cannot run: empty trace, missing signal, bad configuration."""
