"""Split out of lungbench.measure.sweep."""

from __future__ import annotations

import torch

from lungbench.core.errors import UsageError


def parse_device(text: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N', checked against this machine (UsageError otherwise)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(
            f"--device {text!r}: not a device; choose from: cpu, cuda, cuda:N"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {text!r}: unsupported; choose from: cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {text}: no CUDA device on this machine "
                f"(torch {torch.__version__}); choose from: cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(
                f"--device {text}: only {count} CUDA device(s); choose from: "
                + ", ".join(f"cuda:{i}" for i in range(count))
            )
    return device


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
