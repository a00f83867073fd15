"""Time to quality: the target's parsing, the engine stopping at it, and what it records."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from lungbench.core.errors import UsageError
from lungbench.train.config import TrainConfig
from lungbench.train.engine import fit
from lungbench.train.quality import METRICS, parse_target, quality_record


class Blobs(Dataset):
    """(1, 6, 6, 6) noise; class 1 adds a bright centre: learnt in an epoch or two."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = (torch.arange(n) % 2).float()
        self.x = torch.randn(n, 1, 6, 6, 6, generator=g)
        self.x[self.y == 1, :, 2:4, 2:4, 2:4] += 2.0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return (self.x[i],), self.y[i]


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool3d(1),
        nn.Flatten(),
        nn.Linear(4, 1),
    )


def test_parse_target_reads_metric_and_value():
    t = parse_target("AUC=.85")
    assert (t.metric, t.value, t.column) == ("auc", 0.85, "val_auc")
    assert str(t) == "auc=0.85" and t.text() == "auc>=0.85"
    assert parse_target("val_loss=0.4").text() == "loss<=0.4"


@pytest.mark.parametrize("bad", ["auc", "f1=0.8", "auc=high", "auc=1.5", "loss=nan", "=0.3"])
def test_bad_target_is_one_line_usage_error_naming_the_metrics(bad):
    with pytest.raises(UsageError) as err:
        parse_target(bad)
    text = str(err.value)
    assert "\n" not in text and "--target" in text
    if "=" not in bad or bad.startswith(("f1", "=")):
        assert all(name in text for name in METRICS)


def test_reached_follows_the_metrics_direction_and_never_on_nan():
    auc, loss = parse_target("auc=0.8"), parse_target("loss=0.5")
    assert auc.reached({"val_auc": 0.8}) and not auc.reached({"val_auc": 0.79})
    assert loss.reached({"val_loss": 0.5}) and not loss.reached({"val_loss": 0.51})
    assert not auc.reached({"val_auc": math.nan}) and not auc.reached({})


def test_quality_record_sums_the_epochs_up_to_the_target():
    history = [
        {"epoch": 1, "epoch_s": 2.0, "val_auc": 0.6},
        {"epoch": 2, "epoch_s": 3.0, "val_auc": 0.9},
    ]
    rec = quality_record(parse_target("auc=0.85"), history, wall_s=7.5, samples=64)
    assert rec.reached and rec.epochs == 2 and rec.train_s == 5.0 and rec.wall_s == 7.5
    assert rec.samples == 64 and rec.value == 0.9
    assert "reached at epoch 2" in rec.line()
    missed = quality_record(parse_target("auc=0.95"), history, wall_s=7.5, samples=64)
    assert not missed.reached and "NOT reached in 2 epochs" in missed.line()


def test_train_config_refuses_a_bad_target():
    with pytest.raises(UsageError, match="auc, accuracy, loss"):
        TrainConfig(target="speed=3")


def _fit(target: str, epochs: int = 5):
    torch.manual_seed(0)
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=8,
        lr=1e-2,
        progress=False,
        log_epochs=False,
        tensorboard=False,
        target=target,
    )
    return fit(_net(), Blobs(32, 0), Blobs(16, 1), cfg)


def test_fit_stops_at_a_target_reached_in_the_first_epoch():
    # Any validation loss is <= 100: the target is met after epoch 1 of 5, and the fit stops.
    result = _fit("loss=100")
    q = result.time_to_quality
    assert len(result.history) == 1
    assert q["reached"] and q["epochs"] == 1 and q["samples"] == 32
    assert q["wall_s"] >= q["train_s"] > 0  # the validation is inside the wall time


def test_fit_runs_every_epoch_when_the_target_is_out_of_reach():
    result = _fit("loss=0", epochs=2)  # a loss of exactly 0 is never reached
    q = result.time_to_quality
    assert len(result.history) == 2
    assert not q["reached"] and q["epochs"] == 2 and q["samples"] == 64


def test_fit_without_target_records_none():
    assert _fit(None, epochs=1).time_to_quality is None
