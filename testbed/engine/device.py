"""Where the native engine runs: a torch device and dtype from their names, the model placed
there, and the synchronisation a step's wall time needs on an asynchronous device.

The engine keeps one rule: compute tensors (weights, K/V, hidden states, RoPE tables) and the
index tensors that address them live on the device; what the policies read (masks, positions,
signals) comes back to numpy on the CPU, once per exit point.
"""

from __future__ import annotations

import copy
import re

import torch

from testbed.capture_records import AUTO_DEVICE as AUTO
from testbed.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICE_NAME = re.compile(r"^(cpu|cuda(:\d+)?)$")


def resolve_device(name: str = AUTO) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a CUDA device this machine lacks is refused."""
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _DEVICE_NAME.match(name):
        raise ConfigError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r}: this torch ({torch.__version__}) sees no CUDA device"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    return device


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def place(module: torch.nn.Module | None, device: torch.device, dtype: torch.dtype):
    """The module on device in dtype: itself when already there (the usual CPU float32 case),
    else a moved copy, so a checkpoint shared with other runs stays where its loader put it."""
    if module is None:
        return None
    first = next(module.parameters(), None)
    if first is None or (first.device == device and first.dtype == dtype):
        return module
    return copy.deepcopy(module).to(device=device, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels: a step's time is read after its work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
