"""Arrival processes: Poisson and Gamma gaps, for synthetic streams and length-only files."""

from __future__ import annotations

import math

import numpy as np

from testbed.errors import WorkloadError


def check_stream(rate_per_s: float, num_requests: int) -> None:
    """Reject a rate that is not a positive finite number, or an empty stream."""
    if not rate_per_s > 0 or math.isinf(rate_per_s):  # `not >` also rejects NaN
        raise WorkloadError(f"arrival rate must be a positive number, got {rate_per_s}")
    if num_requests < 1:
        raise WorkloadError(f"number of requests must be at least 1, got {num_requests}")


def _from_gaps(gaps_s: np.ndarray) -> np.ndarray:
    # the first request arrives at 0, like a trace read from a file
    return np.concatenate(([0.0], np.cumsum(gaps_s)))  # [num_requests]


def poisson_arrivals(rate_per_s: float, num_requests: int, seed: int) -> np.ndarray:
    """Arrival times (s) of a Poisson process: exponential gaps with mean 1/rate; first at 0."""
    check_stream(rate_per_s, num_requests)
    rng = np.random.default_rng(seed)
    return _from_gaps(rng.exponential(1.0 / rate_per_s, num_requests - 1))


def gamma_arrivals(rate_per_s: float, cv: float, num_requests: int, *, seed: int) -> np.ndarray:
    """Arrival times (s) with Gamma gaps of mean 1/rate and coefficient of variation `cv`
    (cv > 1: burstier than Poisson; cv = 1: same distribution as Poisson); first at 0."""
    check_stream(rate_per_s, num_requests)
    if not cv > 0 or math.isinf(cv):
        raise WorkloadError(f"coefficient of variation must be a positive number, got {cv}")
    shape = 1.0 / cv**2  # Gamma(k, θ) has cv = 1/sqrt(k) and mean kθ
    rng = np.random.default_rng(seed)
    return _from_gaps(rng.gamma(shape, 1.0 / (rate_per_s * shape), num_requests - 1))


def synthetic_arrivals(
    rate_per_s: float, cv: float | None, num_requests: int, *, seed: int
) -> np.ndarray:
    """Poisson arrivals, or Gamma arrivals when a coefficient of variation is given."""
    if cv is None:
        return poisson_arrivals(rate_per_s, num_requests, seed)
    return gamma_arrivals(rate_per_s, cv, num_requests, seed=seed)
