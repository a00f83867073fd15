"""Layer 4 (models): A small model registry in the style of timm's `_registry.py`.

    @register_model
    def dualpath3d(**kw) -> nn.Module: ...

    model = create_model("dualpath3d", filters=16)
    for name in list_models(): ...

Builders take keyword arguments only and never print, log, time or read the environment.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from lungbench.core.errors import UsageError, look_up_option

ModelBuilder = Callable[..., nn.Module]

_MODELS: dict[str, ModelBuilder] = {}
_EXAMPLE_INPUTS: dict[str, tuple[tuple[int, ...], ...]] = {}
_INPUT_SHAPES: dict[str, Callable[..., Sequence[Sequence[int]]]] = {}

# A small odd-sized 3D input, as MONAI's tests use: per-sample (C, D, H, W).
DEFAULT_EXAMPLE_INPUTS: tuple[tuple[int, ...], ...] = ((1, 33, 34, 35),)


def register_model(
    fn: ModelBuilder | None = None,
    *,
    inputs=DEFAULT_EXAMPLE_INPUTS,
    shapes: Callable[..., Sequence[Sequence[int]]] | None = None,
):
    """Register a builder under its function name (decorator, with or without arguments).

    `inputs` gives small per-sample example input shapes, one per forward argument, for
    tests and smoke runs: `@register_model(inputs=((1, 33, 34, 35), (1, 33, 34, 35)))`.
    `shapes(**options)` is the hook that gives the per-sample input shapes the model is
    measured and trained on for the builder's options (default: `inputs`).
    """

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        name = builder.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = builder
        _EXAMPLE_INPUTS[name] = tuple(tuple(s) for s in inputs)
        if shapes is not None:
            _INPUT_SHAPES[name] = shapes
        return builder

    return decorate(fn) if fn is not None else decorate


def example_input_shapes(name: str, batch: int = 2) -> tuple[tuple[int, ...], ...]:
    """Small batched example input shapes for model `name` built with default options."""
    model_builder(name)
    return tuple((batch, *s) for s in _EXAMPLE_INPUTS[name])


def input_shapes(name: str, batch: int = 2, **options: Any) -> tuple[tuple[int, ...], ...]:
    """Batched input shapes of model `name` built with `options` (the registry's hook; the
    example inputs for a model without one)."""
    model_builder(name)
    hook = _INPUT_SHAPES.get(name)
    if hook is None:
        return example_input_shapes(name, batch)
    return tuple((batch, *s) for s in hook(**options))


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names, sorted, optionally filtered by a shell-style pattern."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def model_builder(name: str) -> ModelBuilder:
    """The builder for `name`; UsageError listing the known names otherwise."""
    return _MODELS[look_up_option(name, list_models(), what="model")]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build model `name` with keyword arguments; unknown names or arguments are UsageErrors."""
    builder = model_builder(name)
    accepted = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = [k for k in kwargs if k not in accepted]
    if unknown and not takes_any:
        raise UsageError(
            f"model {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(accepted)}"
        )
    return builder(**kwargs)
