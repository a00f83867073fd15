"""Layer 1 (core): which device a run uses, and waiting for it.

One parser for every `--device` (bench, profile, peaks, training): a device this machine
does not have is a one-line UsageError naming the valid choices.
"""

from __future__ import annotations

import torch

from lungbench.core.errors import UsageError


def parse_device(text: str, what: str = "--device") -> torch.device:
    """'cpu', 'cuda' or 'cuda:N', checked against this machine (UsageError otherwise);
    `what` names the option or field in the message."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"{what} {text!r}: not a device; choose from: cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{what} {text!r}: unsupported; choose from: cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"{what} {text}: no CUDA device on this machine "
                f"(torch {torch.__version__}); choose from: cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(
                f"{what} {text}: only {count} CUDA device(s); choose from: "
                + ", ".join(f"cuda:{i}" for i in range(count))
            )
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU. A CPU-GPU sync point."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
