"""Layer 6 (measure): the workload of one measurement and the protocol that measures it.

A `Workload` says what is trained: the model and its options, the batch, the device, the
CPU threads and the seed; its input shapes come from the model registry's hook
(lungbench.models.input_shapes: the preset's cube grids for the two-path model). Every
measuring config composes one with the step's `Switches` (lungbench.step) and, for timing,
a `Protocol`:

    cfg = BenchConfig(Workload(filters=16, batch_size=2), auto_switches(), Protocol(repeats=20))
    model = cfg.workload.build_model(device)
    inputs, target = cfg.workload.random_batch(device)

Each field is declared once, with its command-line option (flag, value parser, help:
lungbench.core.options); `bench` sweeps lists of them (`option_like(Workload, "filters",
(8, 16), nargs="+")`), `profile` takes one of each and `predict` takes targets.

Records keep the fields flat (model, preset, filters, batch_size, ..., warmup, repeats, ...),
as lungbench 0.1.0 wrote them, so `compare` and `report` read old and new run folders alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lungbench.core.options import non_negative_int, option, positive_int

if TYPE_CHECKING:  # torch and the models load where a model or a tensor is made: the
    import torch  # declarations alone (a command's --help, predict's options) stay light
    from torch import nn

WORKLOAD = "workload"  # the --help section of these options


@dataclass(frozen=True)
class Workload:
    """What one measurement trains (every field is recorded, flat, with the result)."""

    model: str = option(
        "dualpath3d",
        group=WORKLOAD,
        default_note="see `lungbench bench --list-models`",
        help="registered model",
    )
    preset: str = option(  # the two-path model's cube geometry (lungbench.data.geometry)
        "default",
        group=WORKLOAD,
        help="geometry preset of the two-path model: default (32^3), iso64 (64^3), "
        "dey2018 (5x50x50)",
    )
    filters: int = option(8, type=positive_int, group=WORKLOAD, help="base width")
    batch_size: int = option(
        2, flag="--batch", type=positive_int, metavar="BATCH", group=WORKLOAD, help="batch size"
    )
    device: str = option("cpu", flag="--device", group=WORKLOAD, help="cpu, cuda or cuda:N")
    threads: int | None = option(  # None = torch's default
        None,
        type=positive_int,
        group=WORKLOAD,
        default_text="torch's, all cores",
        help="CPU intra-op threads",
    )
    seed: int = option(0, type=non_negative_int, group=WORKLOAD, help="random seed")
    # Conv levels per path, for a model whose builder takes `depth` (None: the builder's
    # default, dualpath3d's 4). No command-line option: set where a recipe trains another
    # depth than the bench's, so that what is tuned or measured is what is trained
    # (`bench --to-quality` trains lidc-pretrain's depth-3 quick model).
    depth: int | None = None

    def model_kwargs(self) -> dict[str, Any]:
        """The options of this workload that its model's builder takes (ValueError for a
        depth given to a model without one)."""
        from lungbench.models import model_builder

        accepted = inspect.signature(model_builder(self.model)).parameters
        options: dict[str, Any] = {"preset": self.preset, "filters": self.filters}
        if self.depth is not None:
            if "depth" not in accepted:
                raise ValueError(f"model {self.model!r} takes no depth (given {self.depth})")
            options["depth"] = self.depth
        return {k: v for k, v in options.items() if k in accepted}

    def input_shapes(self, batch: int | None = None) -> list[tuple[int, ...]]:
        """Batched input shapes, one per forward argument, from the registry's hook."""
        from lungbench.models import input_shapes

        return list(input_shapes(self.model, batch or self.batch_size, **self.model_kwargs()))

    def build_model(self, device: torch.device) -> nn.Module:
        """The model with the seed's initial weights, on `device`, in training mode."""
        import torch

        from lungbench.models import create_model

        torch.manual_seed(self.seed)
        return create_model(self.model, **self.model_kwargs()).to(device).train()

    def random_batch(
        self,
        device: torch.device,
        seed: int | None = None,
        batch: int | None = None,
        shapes: Sequence[tuple[int, ...]] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Random inputs (per-sample `shapes`, default: the registry's) and random 0/1
        targets, resident on `device`; the same for the same seed."""
        return random_batch(
            shapes or [s[1:] for s in self.input_shapes(1)],
            batch or self.batch_size,
            device,
            self.seed if seed is None else seed,
        )


@dataclass(frozen=True)
class Protocol:
    """How a configuration is timed: warm-up steps off the clock, timed repeats (a fixed
    number, or until the median is known well enough), and one end-to-end epoch through the
    DataLoader (or its first `epoch_samples` samples)."""

    warmup: int = option(3, type=non_negative_int, help="warm-up steps off the clock")
    repeats: int = 10  # exactly this many; with ci_target, at least this many
    epoch: bool = True
    epoch_samples: int | None = option(  # None = the store's training split
        None,
        type=positive_int,
        default_text="the whole 80% training split",
        help="samples per timed epoch",
    )
    # Adaptive repeats: go on until the median's 95% confidence interval is within
    # +-ci_target of it (0.03 = +-3%), `max_repeats` are timed or `budget_s` seconds of
    # repeats have passed, whichever comes first. None: exactly `repeats`.
    ci_target: float | None = None
    max_repeats: int = 100
    budget_s: float = 30.0


def random_batch(
    shapes: Sequence[Sequence[int]], batch: int, device: torch.device, seed: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The one maker of random batches: inputs of per-sample `shapes` and 0/1 targets."""
    import torch

    g = torch.Generator().manual_seed(seed)
    inputs = [torch.rand((batch, *shape), generator=g).to(device) for shape in shapes]
    target = torch.randint(0, 2, (batch,), generator=g).float().to(device)
    return inputs, target
