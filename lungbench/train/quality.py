"""Layer 9 (train): time to quality: a validation target (`auc=0.85`) and the time to reach it.

What a researcher pays is the time to a model of a given quality, not the time per epoch: a
switch that makes a step faster but needs more epochs can lose. MLPerf ranks training
systems this way (time-to-train to a quality target). The engine (lungbench.train.engine)
checks the target after every epoch's validation, stops when it is reached and records the
time to it (wall time, epochs, samples seen) as a QualityRecord.

    target = parse_target("auc=0.85")        # UsageError names the valid metrics
    target.reached({"val_auc": 0.9})         # True
    parse_target("loss=0.4").reached({"val_loss": 0.39})   # loss: lower is better
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lungbench.core.errors import UsageError
from lungbench.core.options import OptionValueError

# The metric a user names -> the validation column of the history and whether higher is
# better. Validation metrics only: a target on the training loss rewards overfitting.
METRICS: dict[str, tuple[str, bool]] = {
    "auc": ("val_auc", True),
    "accuracy": ("val_accuracy", True),
    "loss": ("val_loss", False),
}


@dataclass(frozen=True)
class QualityTarget:
    """A validation metric and the value it must reach (>= for auc/accuracy, <= for loss)."""

    metric: str  # a key of METRICS
    value: float

    @property
    def column(self) -> str:
        """The history column the target is read from (val_auc, ...)."""
        return METRICS[self.metric][0]

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric][1]

    def reached(self, row: Mapping[str, Any]) -> bool:
        """Whether an epoch's history row meets the target (a NaN metric never does: AUC of a
        validation set with one class)."""
        got = row.get(self.column)
        if got is None or not math.isfinite(float(got)):
            return False
        return float(got) >= self.value if self.higher_is_better else float(got) <= self.value

    def text(self) -> str:
        """`auc>=0.85` / `loss<=0.4`, for console lines and tables."""
        return f"{self.metric}{'>=' if self.higher_is_better else '<='}{self.value:g}"

    def __str__(self) -> str:  # the form the option takes, e.g. in config.json
        return f"{self.metric}={self.value:g}"


def parse_target(text: str, flag: str = "--target") -> QualityTarget:
    """`METRIC=VALUE` -> QualityTarget; UsageError (one line, the valid metrics) otherwise."""
    valid = ", ".join(METRICS)
    usage = f"{flag} {text!r}: expected METRIC=VALUE with METRIC one of {valid} (e.g. auc=0.85)"
    name, sep, value = str(text).partition("=")
    name = name.strip().lower().removeprefix("val_")
    if not sep or name not in METRICS:
        raise UsageError(usage)
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"{usage}; {value.strip()!r} is not a number") from None
    if not math.isfinite(number):
        raise UsageError(f"{usage}; the value must be a finite number")
    if name in ("auc", "accuracy") and not 0.0 <= number <= 1.0:
        raise UsageError(f"{flag} {text!r}: {name} is between 0 and 1, got {number:g}")
    return QualityTarget(name, number)


def target_option(text: str) -> str:
    """The option parser of --target: the text, normalised (`AUC=.85` -> `auc=0.85`), or
    OptionValueError (argparse then prints one line and exits 2)."""
    try:
        return str(parse_target(text))
    except UsageError as exc:
        # argparse adds "argument --target: " itself
        raise OptionValueError(str(exc).removeprefix(f"--target {text!r}: ")) from None


@dataclass(frozen=True)
class QualityRecord:
    """How long a fit took to its target (or, `reached` False, how long it ran without).

    wall_s: from the first training step of the fit to the end of the validation that met
    the target, validations included (what a user waits; MLPerf's run_start to run_stop).
    train_s: the training epochs' own time. samples: training samples seen on all ranks.
    """

    target: str  # auc>=0.85
    reached: bool
    epochs: int  # epochs run up to the target (all of them when not reached)
    wall_s: float
    train_s: float
    samples: int
    value: float  # the metric at that epoch

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """The console line: `target auc>=0.85 reached at epoch 4: 12.3 s, 152 samples`."""
        where = (
            f"reached at epoch {self.epochs}"
            if self.reached
            else (f"NOT reached in {self.epochs} epochs")
        )
        return (
            f"target {self.target} {where}: {self.wall_s:.1f} s wall "
            f"({self.train_s:.1f} s training), {self.samples} samples seen "
            f"(value {self.value:.4g})"
        )


def quality_record(
    target: QualityTarget,
    history: list[Mapping[str, Any]],
    wall_s: float,
    samples: int,
) -> QualityRecord:
    """The record after the last row of `history`: reached if that row meets the target
    (the engine stops there), else the time so far without reaching it."""
    last = history[-1]
    return QualityRecord(
        target=target.text(),
        reached=target.reached(last),
        epochs=len(history),
        wall_s=float(wall_s),
        train_s=float(sum(float(r.get("epoch_s", 0.0)) for r in history)),
        samples=int(samples),
        value=float(last.get(target.column, float("nan"))),
    )
