"""The training engine: it learns, resumes exactly, survives SIGTERM, rejects bad checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from lungbench.core.errors import DataError, UsageError
from lungbench.data.transforms import make_transform
from lungbench.train.checkpoint import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    load_checkpoint,
    load_model_from_checkpoint,
    save_checkpoint,
)
from lungbench.train.config import TrainConfig
from lungbench.train.engine import METRICS_FILE, FitOptions, TrainingInterrupted, fit, infer
from lungbench.train.metrics import classification_metrics

REPO = Path(__file__).resolve().parent.parent


class BlobSet(Dataset):
    """(1, 8, 8, 8) noise; class 1 adds a faint bright cube in the centre. Easy to learn."""

    def __init__(
        self, n: int, seed: int, signal_strength: float = 0.8, dtype=torch.float32, transform=None
    ):
        g = torch.Generator().manual_seed(seed)
        self.y = (torch.arange(n) % 2).to(dtype)
        self.x = torch.randn(n, 1, 8, 8, 8, generator=g)
        self.x[self.y == 1, :, 3:5, 3:5, 3:5] += signal_strength * 3
        self.on_item = None
        self.transform = transform  # a lungbench.data.transforms preset, numpy in and out

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        if self.on_item is not None:
            self.on_item()
        if self.transform is not None:
            (x,) = self.transform((self.x[i].numpy(),))
            return (torch.from_numpy(x),), self.y[i]
        return (self.x[i],), self.y[i]


class TinyNet(nn.Module):
    """Conv -> BN -> ReLU -> pool -> dropout -> linear: (B, 1, D, H, W) -> (B, out)."""

    def __init__(self, out: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(1, 4, 3, padding=1),
            nn.BatchNorm3d(4),
            nn.ReLU(),
            nn.AdaptiveMaxPool3d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
        )
        self.head = nn.Linear(4, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _config(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=8, lr=0.01, seed=1, progress=False, tensorboard=False)
    return TrainConfig(**{**base, **kw})


def _model(seed: int = 0, out: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return TinyNet(out)


def test_short_run_learns_easy_set(tmp_path):
    train, val = BlobSet(64, seed=0), BlobSet(32, seed=1)
    config = _config(epochs=4, tensorboard=True)
    result = fit(_model(), train, val, config, run_dir=tmp_path)
    assert result.best_row["val_auc"] > 0.9  # chance is 0.5
    metrics = pd.read_csv(tmp_path / METRICS_FILE)
    assert list(metrics["epoch"]) == [1, 2, 3, 4]
    assert {
        "train_loss",
        "val_loss",
        "val_accuracy",
        "val_auc",
        "epoch_s",
        "samples_per_s",
        "lr",
    } <= set(metrics.columns)
    assert result.best_val_loss == pytest.approx(metrics["val_loss"].min())
    assert (tmp_path / BEST_CHECKPOINT).exists() and (tmp_path / "tb").is_dir()
    assert result.samples_per_s > 0 and result.peak_memory_bytes >= 0  # CPU: above start


@pytest.mark.parametrize(
    "optimizer,schedule", [("sgd", "step"), ("adadelta", "cosine"), ("adam", "onecycle")]
)
def test_optimizers_and_schedules_run(optimizer, schedule):
    config = _config(
        epochs=2,
        optimizer=optimizer,
        schedule=schedule,
        step_size=1,
        lr=1.0 if optimizer == "adadelta" else 0.01,
    )
    result = fit(_model(), BlobSet(16, 0), BlobSet(8, 1), config)
    assert len(result.history) == 2
    lrs = list(result.history["lr"])
    if schedule == "step":
        assert lrs[1] == pytest.approx(0.01 * 0.1)
    if schedule == "cosine":  # T_max = 2 epochs: lr at epoch 2 is half-way down the cosine
        assert lrs == pytest.approx([1.0, 0.5])
    if schedule == "onecycle":  # warm-up then annealing: never above max_lr, ends near 0
        assert all(0 < lr <= 0.01 + 1e-12 for lr in lrs)


def test_onecycle_lr_per_step_peaks_where_the_schedule_says(tmp_path):
    """One-cycle moves the learning rate every step, so the engine logs the lr each step ran
    with (FitResult.lr_steps, RUN/lr_steps.csv): warm-up from max_lr / 25 to max_lr at
    pct_start (30%) of the steps, then annealing, exactly as torch's OneCycleLR lays it out."""
    config = _config(epochs=2, batch_size=4, lr=0.01, schedule="onecycle")
    result = fit(_model(), BlobSet(40, 0), BlobSet(8, 1), config, run_dir=tmp_path)
    steps, total = result.lr_steps, 2 * 10
    assert list(steps["step"]) == list(range(1, total + 1))
    assert list(steps["epoch"]) == [1] * 10 + [2] * 10
    lrs = steps["lr"].to_numpy()
    peak = int(np.argmax(lrs))
    # warm-up ends at OneCycleLR's step_num pct_start * total - 1 = 5: the 6th step's lr
    assert steps["step"].iloc[peak] == round(0.3 * total) == 6
    assert lrs[peak] == pytest.approx(0.01)
    assert lrs[0] == pytest.approx(0.01 / 25)  # div_factor
    assert lrs[-1] == pytest.approx(0.01 / 25 / 1e4)  # final_div_factor
    assert (np.diff(lrs[: peak + 1]) > 0).all() and (np.diff(lrs[peak:]) < 0).all()
    # step for step what the schedule itself gives
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=total)
    expected = []
    for _ in range(total):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    np.testing.assert_allclose(lrs, expected)
    # written beside metrics.csv (whose one lr per epoch is the lr after its last step)
    assert pd.read_csv(tmp_path / "lr_steps.csv")["lr"].tolist() == pytest.approx(list(lrs))


def test_recalibrated_batchnorm_has_the_datasets_statistics():
    """Precise BN: the running statistics become the data's (one batch: its mean and unbiased
    variance), frozen norms keep theirs, mode and momentum are restored; before_eval runs
    once per epoch on the unwrapped model."""
    from lungbench.train.batchnorm import recalibrate_batchnorm

    g = torch.Generator().manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(16, 2, 5, 5, generator=g)
    model = nn.Sequential(nn.BatchNorm2d(2), nn.BatchNorm2d(2))
    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    model.train()
    data = [((x[i],), torch.tensor(0.0)) for i in range(16)]
    assert recalibrate_batchnorm(model, data, batch_size=16) == 1
    assert torch.allclose(model[0].running_mean, x.mean(dim=(0, 2, 3)))
    assert torch.allclose(model[0].running_var, x.var(dim=(0, 2, 3), unbiased=True))
    assert torch.equal(model[1].running_mean, torch.zeros(2))  # frozen: untouched
    assert model.training and model[0].momentum == 0.1

    seen = []
    fit(
        _model(),
        BlobSet(16, 0),
        BlobSet(8, 1),
        _config(epochs=2),
        options=FitOptions(before_eval=seen.append),
    )
    assert len(seen) == 2 and isinstance(seen[0], TinyNet)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_resume_refuses_new_length_for_length_bound_schedules(tmp_path, schedule):
    """cosine and one-cycle are laid out over the planned epochs: a longer resume is refused
    (one-cycle would crash past its total steps, cosine would climb back up)."""
    config = _config(epochs=1, restore_best=False, schedule=schedule)
    fit(_model(), BlobSet(16, 0), BlobSet(8, 1), config, run_dir=tmp_path)
    longer = _config(epochs=3, restore_best=False, schedule=schedule)
    with pytest.raises(UsageError, match=f"epochs 1 -> 3 \\(the {schedule} schedule"):
        fit(_model(), BlobSet(16, 0), BlobSet(8, 1), longer, resume=tmp_path / LAST_CHECKPOINT)


def test_early_stopping_and_best_restored():
    # lr so large that validation loss stops improving at once.
    config = _config(epochs=8, lr=5.0, optimizer="sgd", patience=2)
    model = _model()
    result = fit(model, BlobSet(16, 0), BlobSet(8, 1), config)
    assert result.stopped_early and len(result.history) < 8
    assert len(result.history) - result.best_epoch == 2
    # The model ends with the best epoch's weights, not the last epoch's.
    best_loss = result.history["val_loss"].min()
    assert result.best_val_loss == pytest.approx(best_loss)
    assert _val_loss(model, BlobSet(8, 1)) == pytest.approx(best_loss, rel=1e-4)


def _val_loss(model: nn.Module, dataset: Dataset) -> float:
    model.eval()
    with torch.no_grad():
        x = torch.stack([dataset[i][0][0] for i in range(len(dataset))])
        y = torch.stack([dataset[i][1] for i in range(len(dataset))])
        logits = model(x).reshape(y.shape)
        return float(nn.functional.binary_cross_entropy_with_logits(logits, y.float()))


def test_multiclass_and_multilabel_targets():
    class Multi(BlobSet):
        def __getitem__(self, i):
            (x,), y = super().__getitem__(i)
            return (x,), y.long()

    result = fit(_model(out=2), Multi(16, 0), Multi(8, 1), _config(epochs=1))
    assert {"val_accuracy", "val_auc"} <= set(result.history.columns)
    probs, targets = infer(_model(out=2), Multi(8, 1), batch_size=4)
    assert probs.shape == (8, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    metrics = classification_metrics(
        np.array([[0.9, 0.2], [0.1, 0.8], [0.7, 0.6]]),
        np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]),
    )
    assert metrics["accuracy"] == pytest.approx(5 / 6)
    assert metrics["auc"] == pytest.approx(1.0)  # label 0: 0.9 vs (0.1, 0.7); label 1 perfect


def _augmented(n: int = 32) -> BlobSet:
    return BlobSet(n, 0, transform=make_transform("rotation_only", seed=3))


def test_resume_after_interrupted_epoch_matches_uninterrupted(tmp_path):
    """SIGUSR1 in the middle of epoch 2; the resumed run ends with identical weights.

    Random rotations and dropout: both random streams must continue where they stopped.
    """
    config = _config(epochs=3, restore_best=False)
    reference = _model()  # TinyNet has dropout
    fit(reference, _augmented(), BlobSet(8, 1), config)

    train = _augmented()
    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] == 32 + 12:  # epoch 2, inside its second batch
            os.kill(os.getpid(), signal.SIGUSR1)

    train.on_item = interrupt
    with pytest.raises(TrainingInterrupted) as info:
        fit(_model(), train, BlobSet(8, 1), config, run_dir=tmp_path / "a")
    ckpt = load_checkpoint(info.value.checkpoint)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)

    resumed = _model(seed=99)  # different init: everything must come from the checkpoint
    result = fit(
        resumed,
        _augmented(),
        BlobSet(8, 1),
        config,
        run_dir=tmp_path / "b",
        resume=info.value.checkpoint,
    )
    assert list(result.history["epoch"]) == [1, 2, 3]
    # the per-step learning rates of the steps before the signal came back with the checkpoint
    assert list(result.lr_steps["step"]) == list(range(1, 3 * 4 + 1))
    for (name, a), b in zip(
        reference.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_resume_rejects_changed_training_options(tmp_path):
    config = _config(epochs=1, restore_best=False)
    fit(_model(), BlobSet(16, 0), BlobSet(8, 1), config, run_dir=tmp_path)
    last = tmp_path / LAST_CHECKPOINT
    changed = _config(epochs=2, restore_best=False, lr=10.0, batch_size=4)
    with pytest.raises(UsageError) as info:
        fit(_model(), BlobSet(16, 0), BlobSet(8, 1), changed, resume=last)
    message = str(info.value)
    assert "lr 0.01 -> 10.0" in message and "batch_size 8 -> 4" in message
    assert "epochs" not in message.split("differ")[1].split("(only")[0]
    # epochs, device, workers, progress and TensorBoard may change.
    more = _config(epochs=2, restore_best=False, num_workers=0, progress=False, tensorboard=True)
    result = fit(_model(), BlobSet(16, 0), BlobSet(8, 1), more, resume=last)
    assert list(result.history["epoch"]) == [1, 2]


# The planted point: once the first epoch's checkpoint exists, each sample waits for the
# test's "signalled" marker, which it writes after sending SIGTERM; so the signal always lands
# inside the second epoch, however slow or busy the machine.
SIGTERM_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_train import BlobSet, _config, _model
    from lungbench.train.engine import fit, TrainingInterrupted, LAST_CHECKPOINT
    torch.set_num_threads(1)
    run_dir = Path(sys.argv[1])

    class Slow(BlobSet):
        def __getitem__(self, i):
            while (run_dir / LAST_CHECKPOINT).exists() and not (run_dir / "signalled").exists():
                time.sleep(0.01)
            return super().__getitem__(i)

    try:
        fit(_model(), Slow(48, 0), BlobSet(8, 1), _config(epochs=4, restore_best=False),
            run_dir=sys.argv[1])
    except TrainingInterrupted as exc:
        print("INTERRUPTED", exc.checkpoint, flush=True)
        sys.exit(exc.exit_code)
""")


def _run_script(tmp_path: Path, *args: str) -> subprocess.Popen:
    script = tmp_path / "job.py"
    script.write_text(SIGTERM_SCRIPT.format(tests=str(REPO / "tests")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted(tmp_path):
    """What SLURM does before a time limit: SIGTERM, checkpoint, exit 143; resume finishes."""
    job = _run_script(tmp_path, str(tmp_path / "cut"))
    deadline = time.time() + 60
    while not (tmp_path / "cut" / LAST_CHECKPOINT).exists():  # first epoch done
        assert job.poll() is None and time.time() < deadline, job.communicate()
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)
    (tmp_path / "cut" / "signalled").touch()  # the planted point lets the epoch go on
    out, err = job.communicate(timeout=60)
    assert job.returncode == 143, err
    assert "INTERRUPTED" in out
    assert load_checkpoint(tmp_path / "cut" / LAST_CHECKPOINT)["epoch"] < 4

    torch.set_num_threads(1)  # as in the job, so that the arithmetic is the same
    config = _config(epochs=4, restore_best=False)
    reference, resumed = _model(), _model(seed=5)
    fit(reference, BlobSet(48, 0), BlobSet(8, 1), config)
    fit(resumed, BlobSet(48, 0), BlobSet(8, 1), config, resume=tmp_path / "cut" / LAST_CHECKPOINT)
    for (name, a), b in zip(
        reference.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_checkpoint_round_trip_and_architecture_check(tmp_path):
    from lungbench.models import create_model

    model = create_model("dualpath3d", preset="dey2018", filters=2, depth=2)
    path = save_checkpoint(
        tmp_path / "c.pt",
        {
            "model_name": "dualpath3d",
            "model_kwargs": {"preset": "dey2018", "filters": 2, "depth": 2},
            "model": model.state_dict(),
        },
    )
    loaded, ckpt = load_model_from_checkpoint(path, expected_model_name="dualpath3d")
    assert ckpt["format"] == "lungbench-checkpoint"
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(UsageError, match="checkpoint is for model 'dualpath3d'"):
        load_model_from_checkpoint(path, expected_model_name="mosmed3d")


def test_corrupt_and_foreign_checkpoints_are_data_errors(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(DataError, match=r"corrupt.pt: not a PyTorch checkpoint \(not a zip"):
        load_checkpoint(corrupt)
    truncated = tmp_path / "truncated.pt"
    torch.save({"weights": torch.zeros(2)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-40])
    with pytest.raises(DataError, match="truncated.pt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(DataError, match="not a lungbench checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(DataError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(DataError, match="corrupt.pt"):
        fit(_model(), BlobSet(8, 0), BlobSet(4, 1), _config(), resume=corrupt)


def test_bad_config_values_are_usage_errors():
    with pytest.raises(UsageError, match="did you mean 'adam'"):
        TrainConfig(optimizer="adma")
    with pytest.raises(UsageError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(UsageError, match="epochs"):
        TrainConfig(epochs=0)


class NoBatchStats(nn.Module):
    """No BatchNorm or dropout: DDP on the same global batch must then match one process."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(1, 4, 3), nn.ReLU(), nn.AdaptiveMaxPool3d(1), nn.Flatten(), nn.Linear(4, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as tdist

    from lungbench.distributed.group import DistContext

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = NoBatchStats()
    context = DistContext(rank=rank, world_size=world, backend="gloo", launcher="test")
    fit(
        model,
        BlobSet(32, 0),
        BlobSet(12, 1),
        _config(epochs=2, batch_size=4, restore_best=False),
        dist=context,
    )
    if rank == 0:
        torch.save(model.state_dict(), out)
    tdist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_matches_single_process_on_the_same_global_batch(tmp_path):
    """2 ranks x batch 4 (gloo) == 1 process x batch 8: same samples per global step."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reference = NoBatchStats()
    fit(
        reference,
        BlobSet(32, 0),
        BlobSet(12, 1),
        _config(epochs=2, batch_size=8, restore_best=False),
    )
    ddp = torch.load(out, weights_only=True)
    for name, value in reference.state_dict().items():
        assert torch.allclose(ddp[name], value, atol=1e-6), name


def test_telemetry_beside_a_fit(tmp_path):
    """A fit with a run folder and a telemetry interval: the time series in telemetry.csv
    and per-epoch summaries in metrics.csv; no telemetry by default."""
    # TensorBoard on: telemetry columns without a source here (GPU) are None, not scalars.
    config = _config(epochs=2, telemetry_interval=0.02, tensorboard=True)
    fit(_model(), BlobSet(32, 0), BlobSet(8, 1), config, run_dir=tmp_path / "on")
    series = pd.read_csv(tmp_path / "on" / "telemetry.csv")
    # However fast the fit: the start sample and each epoch's closing sample (mark()).
    assert len(series) >= 1 + 2 and (series["rss_bytes"] > 0).all()
    assert series["t_s"].is_monotonic_increasing
    metrics = pd.read_csv(tmp_path / "on" / METRICS_FILE)
    assert (metrics["telemetry_rss_peak_bytes"] > 0).all()
    assert metrics["telemetry_cpu_util_mean_percent"].notna().all()
    assert "samples" not in metrics.columns  # used for energy per sample, not a metric
    fit(_model(), BlobSet(32, 0), BlobSet(8, 1), _config(epochs=1), run_dir=tmp_path / "off")
    assert not (tmp_path / "off" / "telemetry.csv").exists()
    assert "telemetry_rss_peak_bytes" not in pd.read_csv(tmp_path / "off" / METRICS_FILE)
