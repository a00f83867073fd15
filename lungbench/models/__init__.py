"""Layer 4 (models): the architectures and their registry.

Import from this package, not from `registry` alone: importing the package registers every
built-in architecture.

What may live here: networks (nn.Module) and how the registry builds them and names their
inputs. What may not: optimizers, precision or layout switches (lungbench.switches, step),
or data.
"""

from lungbench.models.registry import (
    create_model,
    example_input_shapes,
    input_shapes,
    list_models,
    model_builder,
    register_model,
)

# One architecture per module; importing registers its builders.
from lungbench.models import dualpath3d  # noqa: E402,F401  isort: skip
from lungbench.models import mosmed3d  # noqa: E402,F401  isort: skip
from lungbench.models import backbones  # noqa: E402,F401  isort: skip

__all__ = [
    "create_model",
    "example_input_shapes",
    "input_shapes",
    "list_models",
    "model_builder",
    "register_model",
]
