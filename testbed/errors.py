"""Typed exceptions of the library. The CLI turns each into one line and exit code 2."""

from __future__ import annotations


class EetbError(Exception):
    """Base of every error the library raises on bad input."""


class CheckpointError(EetbError):
    """A checkpoint directory is missing, corrupt, or not a supported model."""


class DataError(EetbError):
    """A data set file or directory is missing, unreadable or empty."""


class ConfigError(EetbError, ValueError):
    """A configuration value is out of range."""


class WorkloadError(EetbError):
    """A workload string, trace file or workload parameter is malformed or out of range."""
