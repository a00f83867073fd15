"""Every `lungbench train` recipe stopped half-way keeps the tables of what finished, and
`--resume RUN` continues it in its folder, running only what it lacks."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace

import pandas as pd
import pytest
import torch

from lungbench.cli import main
from lungbench.data.geometry import geometry
from lungbench.data.synth import write_synthetic_store
from lungbench.data.synth2d import write_chestxray_store
from lungbench.experiments import chestxray, lidc_pretrain, lungx_cv, nodule2d
from lungbench.models import create_model
from lungbench.train.engine import FitOptions

SIGTERM_EXIT = 128 + signal.SIGTERM


def _status(run) -> dict:
    return json.loads((run / "run.json").read_text())


@pytest.fixture(scope="module")
def cxr(tmp_path_factory):
    """A 20-image chest X-ray store (3 findings) and a resnet18 weights file."""
    root = tmp_path_factory.mktemp("cxr")
    store, weights = root / "cxr.h5", root / "src.pt"
    write_chestxray_store(
        store, 20, seed=1, size=32, findings=["Infiltration", "Effusion", "Nodule"],
        prevalence_scale=2,
    )  # fmt: skip
    torch.save(create_model("resnet18", in_channels=1).state_dict(), weights)
    return store, weights


@pytest.mark.slow  # the fast tier starts no process and trains nothing
def test_chestxray_stopped_keeps_finished_fits_and_resumes_the_rest(
    tmp_path, cxr, monkeypatch, capsys
):
    store, weights = cxr
    argv = [
        "train", "chestxray", "--quick", "--store", str(store), "--methods", "A", "D",
        "--weights", f"src={weights}", "--cost-samples", "4", "--cost-epochs", "1",
        "--out", str(tmp_path),
    ]  # fmt: skip
    fits, real = [], chestxray.classification_metrics

    def metrics(probs, targets):
        fits.append(1)
        if len(fits) == 3:  # Ctrl-C during the third of the 4 fits (2 folds x A, D)
            raise KeyboardInterrupt
        return real(probs, targets)

    monkeypatch.setattr(chestxray, "classification_metrics", metrics)
    assert main([*argv, "--run-id", "cx"]) == 130
    run = tmp_path / "cx"
    assert _status(run)["status"] == "interrupted"
    folds = pd.read_csv(run / "tables" / "folds.csv")  # the two fits that finished
    assert list(zip(folds["method"], folds["fold"], strict=True)) == [("A", 1), ("A", 2)]
    table = pd.read_csv(run / "tables" / "methods_auc.csv", index_col=0)
    assert "(+/-" in table.loc["src", "A"] and pd.isna(table.loc["none (random init)", "D"])

    # Options that change what is computed are refused; where it runs may change.
    assert main([*argv[:2], "--resume", str(run), "--folds", "3"]) == 2
    assert "--folds 3 (the run has 2)" in capsys.readouterr().err

    fits.clear()
    monkeypatch.setattr(chestxray, "classification_metrics", real)
    counted = []
    monkeypatch.setattr(
        chestxray, "classification_metrics", lambda p, t: counted.append(1) or real(p, t)
    )
    assert main([*argv[:2], "--resume", "cx", "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert len(counted) == 2  # only D's two folds
    info = _status(run)
    assert info["status"] == "complete" and len(info["resumed_utc"]) == 1
    folds = pd.read_csv(run / "tables" / "folds.csv")
    assert sorted(zip(folds["method"], folds["fold"], strict=True)) == [
        ("A", 1), ("A", 2), ("D", 1), ("D", 2),
    ]  # fmt: skip
    assert (run / "tables" / "cost_resnet18.csv").exists()
    assert (run / "environment-resume1.json").exists()


def test_chestxray_quick_grid_is_eight_fits():
    """--quick: 2 folds x (A, the middle B depth, C, D), not 5 x (A, 3 B depths, C, D)."""
    cfg = chestxray.QUICK
    assert [m.label for m in chestxray.methods_of(cfg)] == ["A", "B_9", "C", "D"]
    assert cfg.folds == 2
    full = chestxray.FULL
    assert [m.label for m in chestxray.methods_of(full)] == ["A", "B_10", "B_22", "B_40", "C", "D"]
    assert full.folds == 5


def _signal_after_first_epoch(monkeypatch, module):
    """module.fit, sending SIGTERM (a scheduler's time limit) once after its first epoch."""
    real, sent = module.fit, []

    def fit(*args, **kwargs):
        options = kwargs.get("options") or FitOptions()
        inner = options.before_eval

        def before_eval(model):
            if inner is not None:
                inner(model)
            if not sent:
                sent.append(1)
                os.kill(os.getpid(), signal.SIGTERM)

        return real(*args, **{**kwargs, "options": replace(options, before_eval=before_eval)})

    monkeypatch.setattr(module, "fit", fit)


NODULE2D = [
    "train", "nodule2d", "--quick", "--n", "30", "--image-size", "32", "--epochs", "2",
    "--batch", "8", "--lr", "1e-3", "--tta", "identity",
]  # fmt: skip


@pytest.mark.slow  # the fast tier starts no process and trains nothing
def test_nodule2d_sigterm_then_resume(tmp_path, monkeypatch):
    _signal_after_first_epoch(monkeypatch, nodule2d)
    assert main([*NODULE2D, "--out", str(tmp_path), "--run-id", "n"]) == SIGTERM_EXIT
    run = tmp_path / "n"
    assert _status(run)["status"] == "interrupted"
    assert list(pd.read_csv(run / "tables" / "history.csv")["epoch"]) == [1]
    assert (run / "plots" / "lr_schedule.png").exists()
    monkeypatch.undo()
    assert main(["train", "nodule2d", "--resume", str(run)]) == 0
    assert _status(run)["status"] == "complete"
    assert list(pd.read_csv(run / "tables" / "history.csv")["epoch"]) == [1, 2]
    steps = pd.read_csv(run / "train" / "lr_steps.csv")
    assert list(steps["step"]) == list(range(1, len(steps) + 1))  # continued, not restarted
    assert (run / "tables" / "gradcam_nodule.csv").exists()


@pytest.mark.slow  # the fast tier starts no process and trains nothing
def test_lidc_pretrain_resumes_its_run_folder(tmp_path, tiny_store, monkeypatch):
    _signal_after_first_epoch(monkeypatch, lidc_pretrain)
    argv = [
        "train", "lidc-pretrain", "--quick", "--store", str(tiny_store), "--epochs", "2",
        "--filters", "2", "--depth", "2", "--no-progress", "--out", str(tmp_path),
    ]  # fmt: skip
    assert main([*argv, "--run-id", "p"]) == SIGTERM_EXIT
    run = tmp_path / "p"
    summary = pd.read_csv(run / "tables" / "pretrain_summary.csv")
    assert _status(run)["status"] == "interrupted" and summary["epochs run"].iloc[0] == 1
    monkeypatch.undo()
    assert main(["train", "lidc-pretrain", "--resume", "p", "--out", str(tmp_path)]) == 0
    assert _status(run)["status"] == "complete"
    assert pd.read_csv(run / "tables" / "pretrain_summary.csv")["epochs run"].iloc[0] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "data") == ["p"]


@pytest.mark.slow  # the fast tier starts no process and trains nothing
def test_lungx_cv_stopped_after_a_fold_resumes_the_others(tmp_path, monkeypatch):
    lungx, lidc = tmp_path / "lungx.h5", tmp_path / "lidc.h5"
    write_synthetic_store(lungx, "lungx", 24, geometry("dey2018"), seed=0, workers=1)
    write_synthetic_store(lidc, "lidc", 16, geometry("dey2018"), seed=1, workers=1)
    argv = [
        "train", "lungx-cv", "--quick", "--store", str(lungx), "--lidc-store", str(lidc),
        "--epochs", "1", "--folds", "2", "--no-progress", "--out", str(tmp_path),
    ]  # fmt: skip
    calls, real = [], lungx_cv.run_fold

    def run_fold(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lungx_cv, "run_fold", run_fold)
    assert main([*argv, "--run-id", "cv"]) == 130
    run = tmp_path / "cv"
    auc = pd.read_csv(run / "tables" / "auc.csv", index_col=0)
    assert list(auc.columns) == ["fold 1", "average"]  # the fold that finished
    assert (run / "tables" / "confusion_with_pretraining.csv").exists()

    calls.clear()
    pretrained = []
    monkeypatch.setattr(lungx_cv.lidc_pretrain, "pretrain", lambda *a, **k: pretrained.append(1))
    assert main(["train", "lungx-cv", "--resume", str(run)]) == 0
    assert len(calls) == 1 and not pretrained  # fold 2 only; the pre-training was done
    auc = pd.read_csv(run / "tables" / "auc.csv", index_col=0)
    assert list(auc.columns) == ["fold 1", "fold 2", "average"]
    assert _status(run)["status"] == "complete"
