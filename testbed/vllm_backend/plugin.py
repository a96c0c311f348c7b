"""vLLM's ``vllm.general_plugins`` entry point: makes the early-exit architecture known.

vLLM calls ``register`` in every process it starts (API server, engine core, workers), possibly
more than once, so it only names the class: the model module (and torch) load when a checkpoint
asks for the architecture.
"""

from __future__ import annotations

from testbed.vllm_backend.options import ARCHITECTURE


def register() -> None:
    from vllm import ModelRegistry  # noqa: PLC0415  (vLLM is optional; only vLLM calls this)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"testbed.vllm_backend.model:{ARCHITECTURE}")
