"""Layer 9 (train): checkpoints and the random states that make a resume exact.

Checkpoints are written atomically and read with `weights_only=True`; a resume checkpoint must
come from the same TrainConfig (apart from RESUME_MAY_CHANGE).
"""

from __future__ import annotations

import os
import random
import zipfile
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lungbench.core.errors import DataError, UsageError
from lungbench.train.config import LENGTH_BOUND_SCHEDULES, RESUME_MAY_CHANGE, TrainConfig

CHECKPOINT_FORMAT = "lungbench-checkpoint"


CHECKPOINT_VERSION = 1


LAST_CHECKPOINT = "checkpoint_last.pt"


BEST_CHECKPOINT = "checkpoint_best.pt"


def rng_state() -> dict[str, Any]:
    """All global RNG states as tensors and lists, so they load with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [
            name,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "python": [version, list(pystate), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of rng_state()."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, pystate, gauss = state["python"]
    random.setstate((version, tuple(pystate), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write a checkpoint dict atomically (temporary file + os.replace)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a lungbench checkpoint with weights_only=True; DataError naming the file if bad."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives since torch 1.6
        raise DataError(f"{path}: not a PyTorch checkpoint (not a zip archive)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or holds objects weights_only refuses
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable checkpoint ({first[:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a lungbench checkpoint (no 'format': '{CHECKPOINT_FORMAT}')")
    if int(ckpt.get("version", -1)) > CHECKPOINT_VERSION:
        raise DataError(
            f"{path}: checkpoint version {ckpt['version']} is newer than this "
            f"lungbench reads ({CHECKPOINT_VERSION})"
        )
    if "model" not in ckpt:
        raise DataError(f"{path}: checkpoint has no model weights")
    return ckpt


def load_resume_checkpoint(path: str | os.PathLike, config: TrainConfig) -> dict[str, Any]:
    """Load a checkpoint to resume from; UsageError listing every option that differs.

    Only RESUME_MAY_CHANGE may differ from the config the checkpoint was made with: a new lr
    would be silently overridden by the optimizer state, a new batch size would skip the
    wrong samples of an interrupted epoch.
    """
    ckpt = load_checkpoint(path)
    saved = ckpt.get("config")
    if not isinstance(saved, Mapping):
        raise DataError(f"{path}: checkpoint has no training config ('config'); cannot resume")
    diffs = [
        f"{name} {saved[name]!r} -> {value!r}" if name in saved else f"{name} ? -> {value!r}"
        for name, value in asdict(config).items()
        if name not in RESUME_MAY_CHANGE and (name not in saved or saved[name] != value)
    ]
    # cosine and one-cycle are laid out over the planned length: the saved scheduler state
    # carries it, so a new --epochs would crash one-cycle and restart cosine's annealing.
    if config.schedule in LENGTH_BOUND_SCHEDULES and saved.get("epochs", config.epochs) != (
        config.epochs
    ):
        diffs.append(
            f"epochs {saved['epochs']!r} -> {config.epochs!r} "
            f"(the {config.schedule} schedule is laid out over the planned epochs)"
        )
    if diffs:
        raise UsageError(
            f"{path}: resuming needs the training options the checkpoint was made with; "
            f"these differ (checkpoint -> now): {', '.join(diffs)} "
            f"(only {', '.join(RESUME_MAY_CHANGE)} may change; epochs not under "
            f"{' or '.join(LENGTH_BOUND_SCHEDULES)})"
        )
    return ckpt


def load_model_from_checkpoint(
    path: str | os.PathLike, expected_model_name: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the registered model a checkpoint was made from; returns (model, checkpoint).

    UsageError if it was made for another architecture than `expected_model_name`.
    """
    from lungbench.models import create_model

    ckpt = load_checkpoint(path)
    name = ckpt.get("model_name")
    if name is None:
        raise DataError(f"{path}: checkpoint does not say which model it holds ('model_name')")
    if expected_model_name is not None and name != expected_model_name:
        raise UsageError(
            f"{path}: checkpoint is for model {name!r}, this experiment needs "
            f"{expected_model_name!r}"
        )
    model = create_model(name, **dict(ckpt.get("model_kwargs") or {}))
    _load_weights(model, ckpt["model"], path)
    return model, ckpt


def _load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else ""
        raise UsageError(
            f"{path}: checkpoint weights do not fit this model "
            f"(another architecture or size? {detail[:160]})"
        ) from None
