"""Layer 9 (train): Transfer-learning methods of seed 004: which parameters train and which stay frozen.

    A  head only: the new classification layer trains, the whole backbone is frozen
    B  freeze up to a stage boundary, train the rest (seed 004: ResNet50 "10/22/40 layers",
       DenseNet121 "14/39/88 layers")
    C  everything trains, starting from pretrained weights
    D  everything trains, from random initialisation (no weights loaded)

    model = create_model("resnet50", out_channels=13, keras_compat=True)
    load_weights(model, "imagenet.pt")                 # lungbench.train.weights, for A-C
    plan = apply_method(model, Method("B", freeze=40))  # or freeze="conv5"
    plan.trainable                                      # 15,002,637

Boundaries are named after the network's stages ("conv3", "conv4", "conv5" for ResNet;
"block2", "block3", "block4" for DenseNet) or given as the number of weight layers before
them, counted as the seed counts them: convolution layers on the main path, without the
shortcut convolutions (ResNet50: conv1 + 3x3 = 10 before conv3, 22 before conv4, 40 before
conv5; DenseNet121: 14, 39 and 88 before dense blocks 2, 3 and 4).

Frozen batch-norm layers stay in eval mode, so their running statistics never move: a
forward pre-hook switches them back to eval whenever the training loop calls `model.train()`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from lungbench.core.errors import UsageError, look_up_option
from lungbench.train.weights import under

METHODS = {
    "A": "train the new head only",
    "B": "freeze up to a stage boundary, train the rest",
    "C": "train all layers from pretrained weights",
    "D": "train all layers from random initialisation",
}


@dataclass(frozen=True)
class Method:
    """A transfer method; `freeze` (B only) is a stage name or a layer count."""

    name: str
    freeze: str | int | None = None

    @property
    def label(self) -> str:
        """The seed's column label: A, B_40, C, D."""
        return f"B_{self.freeze}" if self.name == "B" else self.name

    @property
    def uses_pretrained(self) -> bool:
        return self.name != "D"


@dataclass(frozen=True)
class FreezePlan:
    """What `apply_method` did: frozen prefixes and the parameter counts."""

    method: Method
    boundary: str | None  # stage name B froze up to
    frozen_prefixes: tuple[str, ...]
    trainable: int
    frozen: int


def parse_method(text: str) -> Method:
    """'A', 'C', 'D', 'B_40', 'B:40', 'B_conv5' -> Method (UsageError otherwise)."""
    head, sep, rest = text.replace(":", "_").partition("_")
    name = look_up_option(head.upper(), METHODS, what="transfer method")
    if name == "B":
        if not sep or not rest:
            raise UsageError(f"method {text!r}: B needs a freeze depth, e.g. B_40 or B_conv5")
        return Method("B", int(rest) if rest.isdigit() else rest)
    if sep:
        raise UsageError(f"method {text!r}: only B takes a freeze depth (A, B_N, C, D)")
    return Method(name)


def stages(model: nn.Module) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The model's ordered backbone stages (UsageError if it does not describe them)."""
    found = getattr(model, "STAGES", None)
    if not found:
        raise UsageError(
            f"model {type(model).__name__} does not describe its stages; transfer "
            "methods need a backbone network (resnet18..152, densenet121)"
        )
    return found


def head_prefix(model: nn.Module) -> str:
    return model.HEAD


def freeze_points(model: nn.Module) -> dict[str, int]:
    """Stage boundaries where B can stop -> weight layers before each (the seed's counts).

    ResNet50: {"conv2": 1, "conv3": 10, "conv4": 22, "conv5": 40}.
    """
    names = [name for name, _ in stages(model)]
    before: dict[str, int] = {}
    count = 0
    for name, prefixes in stages(model):
        if name != names[0]:
            before[name] = count
        count += _main_path_layers(model, prefixes)
    return before


def _main_path_layers(model: nn.Module, prefixes: Iterable[str]) -> int:
    """Convolution layers under `prefixes`, without shortcut (downsample) convolutions."""
    return sum(
        1
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.conv._ConvNd)
        and under(name, prefixes)
        and "downsample" not in name
    )


def resolve_boundary(model: nn.Module, freeze: str | int) -> str:
    """A stage name or layer count -> the stage name (UsageError listing the valid ones)."""
    points = freeze_points(model)
    by_count = {str(n): name for name, n in points.items()}
    choices = [f"{name} ({n} layers)" for name, n in points.items()]
    text = str(freeze)
    if text in points:
        return text
    if text in by_count:
        return by_count[text]
    raise UsageError(
        f"freeze depth {text!r} does not exist in {type(model).__name__}; "
        f"choose a stage or its layer count: {', '.join(choices)}"
    )


def apply_method(model: nn.Module, method: Method) -> FreezePlan:
    """Set `requires_grad` for `method` and keep frozen batch norms in eval mode."""
    head = head_prefix(model)
    if method.name == "A":
        boundary = None
        frozen = tuple(p for _, prefixes in stages(model) for p in prefixes)
    elif method.name == "B":
        if method.freeze is None:
            raise UsageError("method B needs a freeze depth (a stage name or layer count)")
        boundary = resolve_boundary(model, method.freeze)
        frozen = _prefixes_before(model, boundary)
    else:
        boundary, frozen = None, ()
    for name, param in model.named_parameters():
        param.requires_grad_(not under(name, frozen) or under(name, (head,)))
    _keep_frozen_norms_in_eval(model, frozen)
    trainable, total = count_parameters(model)
    return FreezePlan(method, boundary, frozen, trainable, total - trainable)


def _prefixes_before(model: nn.Module, boundary: str) -> tuple[str, ...]:
    prefixes: list[str] = []
    for name, stage_prefixes in stages(model):
        if name == boundary:
            break
        prefixes += stage_prefixes
    return (*prefixes, *getattr(model, "FREEZE_EXTRA", {}).get(boundary, ()))


def _keep_eval(module: nn.Module, _inputs) -> None:
    # A frozen batch norm must not update its running statistics in a training forward.
    module.eval()


def _keep_frozen_norms_in_eval(model: nn.Module, frozen: tuple[str, ...]) -> None:
    for name, module in model.named_modules():
        handles = getattr(module, "_lungbench_keep_eval", None)
        if handles is not None:  # re-applying a method: drop the previous policy
            handles.remove()
            del module._lungbench_keep_eval
        if isinstance(module, nn.modules.batchnorm._NormBase) and under(name, frozen):
            module.eval()
            module._lungbench_keep_eval = module.register_forward_pre_hook(_keep_eval)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; batch-norm running statistics are buffers and
    count in neither, as Keras's "non-trainable" moving means do not in seed 004's table."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def frozen_norm_layers(model: nn.Module) -> list[str]:
    """Names of the batch-norm layers kept in eval mode by `apply_method`."""
    return [n for n, m in model.named_modules() if hasattr(m, "_lungbench_keep_eval")]
