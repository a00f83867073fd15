"""Layer 9 (train): Pretrained weights from local files only: lungbench never downloads anything.

    report = load_weights(model, "resnet50-imagenet.pth")          # torchvision state dict
    report = load_weights(model, "results/<run>/fold1/checkpoint_best.pt")  # a lungbench run
    report.loaded, report.skipped_head, report.adapted

Accepted files (all read with `torch.load(..., weights_only=True)`):

    a lungbench checkpoint  {"format": "lungbench-checkpoint", "model": state_dict, ...}
    a plain state dict      torchvision's `resnet50-*.pth`, `densenet121-*.pth`, MONAI's
    a wrapped state dict    {"state_dict": ...} or {"model": ...}; "module." prefixes (DDP)
                            are stripped

Key remapping: torchvision's ResNet names are the names here already; torchvision's DenseNet
(`denselayer1.norm1`, old-style `norm.1`, `classifier`) maps onto MONAI's (`denselayer1.layers
.norm1`, `class_layers.out`). The classification head is never taken from the file unless
`keep_head=True` (the target task has its own outputs). A first convolution pretrained on
RGB loads into a one-channel network by summing over its input channels (as timm does), so
grey-scale CT and X-ray images can use ImageNet weights.

Weight chains ("ImageNet, then ChestX-ray8, then the target data") are runs that point at the
previous run's checkpoint; each checkpoint records its chain under "weights_chain", and
`weights_chain(path)` extends it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lungbench.core.errors import DataError, UsageError
from lungbench.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint

SHOW_KEYS = 4  # how many mismatched keys an error lists


@dataclass(frozen=True)
class WeightsFile:
    """A state dict read from disk, and what the file said about itself."""

    path: Path
    state: dict[str, torch.Tensor]
    kind: str  # "lungbench-checkpoint" | "state-dict"
    model_name: str | None = None
    chain: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoadReport:
    """What `load_weights` did, for the run's config.json."""

    path: str
    loaded: int
    skipped_head: tuple[str, ...] = ()
    missing_ok: tuple[str, ...] = ()  # e.g. Keras-compat conv biases absent from the file
    adapted: tuple[str, ...] = ()  # e.g. the first conv summed from RGB to 1 channel
    chain: tuple[str, ...] = field(default_factory=tuple)


def read_weights_file(path: str | os.PathLike) -> WeightsFile:
    """Read a state dict from `path` (DataError naming the file if it is not one).

    lungbench checkpoints are read, and checked, by `lungbench.train.checkpoint.load_checkpoint`; this
    function itself only unwraps the state dicts other tools write.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: weights file not found (lungbench never downloads weights; "
            "give a local torchvision/MONAI .pth or a lungbench checkpoint)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or objects that weights_only refuses to load
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path}: not a readable weights file ({first[:160]})") from None
    if not isinstance(obj, Mapping):
        raise DataError(f"{path}: holds a {type(obj).__name__}, expected a state dict")
    if obj.get("format") == CHECKPOINT_FORMAT:
        # Read again by train's reader, which checks the version and the model weights: one
        # reader for lungbench's own format (a second load, once per run, of a local file).
        ckpt = load_checkpoint(path)
        return WeightsFile(
            path,
            _strip_prefix(ckpt["model"], path),
            CHECKPOINT_FORMAT,
            ckpt.get("model_name"),
            tuple(ckpt.get("weights_chain") or ()),
        )
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    return WeightsFile(path, _strip_prefix(obj, path), "state-dict")


def _strip_prefix(state: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise DataError(f"{path}: no tensors found; not a state dict")
    return {k.removeprefix("module."): v for k, v in tensors.items()}


# torchvision DenseNet -> MONAI DenseNet names.
_TV_DENSE_OLD = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|"
    r"running_mean|running_var|num_batches_tracked))$"
)


_TV_DENSE = re.compile(r"^(features\.denseblock\d+\.denselayer\d+)\.((?:norm|conv)[12]\..*)$")


def remap_keys(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename torchvision DenseNet keys to this model's (ResNet names already agree)."""
    target = set(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        if new not in target:
            old = _TV_DENSE_OLD.match(new)  # "norm.1.weight" (torchvision < 0.4) -> "norm1.weight"
            if old:
                new = f"{old.group(1)}{old.group(2)}"
            m = _TV_DENSE.match(new)
            if m:
                new = f"{m.group(1)}.layers.{m.group(2)}"
            if new.startswith("classifier."):
                new = "class_layers.out." + new.removeprefix("classifier.")
        out[new] = value
    return out


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    keep_head: bool = False,
    expected_model: str | None = None,
) -> LoadReport:
    """Copy the weights in `path` into `model`; UsageError listing mismatched keys if the file
    holds another network (the head is re-initialised unless `keep_head`)."""
    wfile = read_weights_file(path)
    if expected_model and wfile.model_name and wfile.model_name != expected_model:
        raise UsageError(
            f"{wfile.path}: checkpoint holds model {wfile.model_name!r}, "
            f"expected {expected_model!r}"
        )
    state = remap_keys(wfile.state, model)
    own = model.state_dict()
    head = getattr(model, "HEAD", None)
    skipped_head = tuple(k for k in state if not keep_head and head and under(k, (head,)))
    state = {k: v for k, v in state.items() if k not in skipped_head}
    state, adapted = _adapt_first_conv(state, own)
    unexpected = sorted(k for k in state if k not in own)
    shape_bad = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    missing = sorted(k for k in own if k not in state and not (head and under(k, (head,))))
    missing_ok = tuple(k for k in missing if _zero_conv_bias(model, k))
    missing = [k for k in missing if k not in missing_ok]
    if unexpected or shape_bad or missing:
        raise UsageError(
            _mismatch_message(wfile, model, unexpected, shape_bad, missing, state, own)
        )
    own.update(state)
    model.load_state_dict(own)
    chain = (*wfile.chain, str(wfile.path))
    return LoadReport(str(wfile.path), len(state), skipped_head, missing_ok, adapted, chain)


def under(name: str, prefixes: Iterable[str]) -> bool:
    """True if parameter/module `name` is one of `prefixes` or lies inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _adapt_first_conv(
    state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """RGB -> grey first convolution (sum over input channels), grey -> RGB (repeat / 3)."""
    adapted = []
    for key in ("conv1.weight", "features.conv0.weight"):
        if key in state and key in own and state[key].shape != own[key].shape:
            src, dst = state[key], own[key]
            if src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]:
                if dst.shape[1] == 1:
                    state[key] = src.sum(dim=1, keepdim=True)
                elif src.shape[1] == 1:
                    state[key] = src.repeat(1, dst.shape[1], *[1] * (src.ndim - 2)) / dst.shape[1]
                else:
                    continue
                adapted.append(f"{key}: {src.shape[1]} -> {dst.shape[1]} input channels")
    return state, tuple(adapted)


def _zero_conv_bias(model: nn.Module, key: str) -> bool:
    """A bias the Keras-compatible layout added to a convolution (zero: same function)."""
    if not key.endswith(".bias"):
        return False
    module = model.get_submodule(key.removesuffix(".bias"))
    return isinstance(module, nn.modules.conv._ConvNd) and getattr(model, "keras_compat", False)


def _mismatch_message(
    wfile: WeightsFile, model: nn.Module, unexpected, shape_bad, missing, state, own
) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing from the file (e.g. {_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} not in the model (e.g. {_few(unexpected)})")
    if shape_bad:
        k = shape_bad[0]
        parts.append(
            f"{len(shape_bad)} with other shapes (e.g. {k}: file "
            f"{tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
        )
    source = f" (made for {wfile.model_name!r})" if wfile.model_name else ""
    return (
        f"{wfile.path}: weights{source} do not fit {type(model).__name__}: "
        + "; ".join(parts)
        + ". Is it a file for another network or depth?"
    )


def _few(keys: list[str]) -> str:
    more = f", ... {len(keys) - SHOW_KEYS} more" if len(keys) > SHOW_KEYS else ""
    return ", ".join(keys[:SHOW_KEYS]) + more


def weights_chain(path: str | os.PathLike | None) -> list[str]:
    """The chain of weights files a run started from, ending with `path` (empty for None)."""
    if path is None:
        return []
    wfile = read_weights_file(path)
    return [*wfile.chain, str(wfile.path)]
