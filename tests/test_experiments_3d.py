"""The 3D experiments end to end through the CLI, their thesis-layout tables, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from launchenv import clean_env

from lungbench.cli import main
from lungbench.core.runs import read_json
from lungbench.data.geometry import geometry
from lungbench.data.synth import write_synthetic_store
from lungbench.models import create_model
from lungbench.report.training import auc_table, confusion_table
from lungbench.train.checkpoint import save_checkpoint

REGIMES = ["LIDC only", "w/o pre-training", "w/ pre-training"]


@pytest.fixture(scope="module")
def out_root(tmp_path_factory):
    return tmp_path_factory.mktemp("results")


CV_N = 24  # LUNGx-like nodules of the quick_cv store


@pytest.fixture(scope="module")
def cv_stores(tmp_path_factory):
    """Small generated LUNGx-like (24) and LIDC-like (16) stores on the small dey2018 grid."""
    root = tmp_path_factory.mktemp("cv_stores")
    lungx, lidc = root / "lungx.h5", root / "lidc.h5"
    write_synthetic_store(lungx, "lungx", CV_N, geometry("dey2018"), seed=0, workers=1)
    write_synthetic_store(lidc, "lidc", 16, geometry("dey2018"), seed=1, workers=1)
    return lungx, lidc


@pytest.fixture(scope="module")
def small_stores(tmp_path_factory):
    """Tiny LUNGx-like and LIDC-like stores (6 nodules each) on the dey2018 grid, for the
    fast tests that are refused or fail before any training."""
    root = tmp_path_factory.mktemp("small_stores")
    lungx, lidc = root / "lungx.h5", root / "lidc.h5"
    write_synthetic_store(lungx, "lungx", 6, geometry("dey2018"), seed=0, workers=1)
    write_synthetic_store(lidc, "lidc", 6, geometry("dey2018"), seed=1, workers=1)
    return lungx, lidc


@pytest.fixture(scope="module")
def quick_cv(out_root, cv_stores):
    """One `lungbench train lungx-cv --quick` run (with pre-training) on the small stores."""
    lungx, lidc = cv_stores
    code = main(
        [
            "train",
            "lungx-cv",
            "--quick",
            "--store",
            str(lungx),
            "--lidc-store",
            str(lidc),
            "--epochs",
            "1",
            "--out",
            str(out_root),
            "--run-id",
            "cv",
            "--no-progress",
        ]
    )
    return code, out_root / "cv"


def _run_dirs(root) -> set[str]:
    return {p.name for p in root.iterdir() if p.name != "data"}


def _message_of(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message"
    return err[-1]


@pytest.mark.slow
def test_lungx_cv_quick_writes_the_thesis_tables(quick_cv):
    code, run_dir = quick_cv
    assert code == 0
    info = json.loads((run_dir / "run.json").read_text())
    assert (info["kind"], info["status"]) == ("train", "complete")
    assert "GENERATED" in info["data"]
    for name in (
        "config.json",
        "environment.json",
        "metrics.csv",
        "plots/roc.png",
        "plots/loss_fold1.png",
        "plots/loss_fold3.png",
        "tables/auc.md",
        "lidc_pretrain/checkpoint_best.pt",
    ):
        assert (run_dir / name).exists(), name
    auc = pd.read_csv(run_dir / "tables" / "auc.csv", index_col=0)
    assert list(auc.index) == REGIMES
    assert list(auc.columns) == ["fold 1", "fold 2", "fold 3", "average"]
    assert np.allclose(auc["average"], auc[["fold 1", "fold 2", "fold 3"]].mean(axis=1))
    for regime in ("lidc_only", "without_pretraining", "with_pretraining"):
        table = pd.read_csv(run_dir / "tables" / f"confusion_{regime}.csv", index_col=0)
        assert list(table.index) == ["Predictions Benign", "Predictions Malignant", "Total"]
        assert list(table.columns) == ["Benign", "Malignant", "Total"]
        assert table.loc["Total", "Total"] == CV_N  # every nodule tested once
        assert (table.iloc[:2, :2].sum(axis=1) == table.iloc[:2, 2]).all()
        assert (table.iloc[:2].sum(axis=0) == table.loc["Total"]).all()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert set(metrics["fold"]) == {1, 2, 3}
    assert set(metrics["regime"]) == {"w/o pre-training", "w/ pre-training"}


def test_auc_table_layout():
    table = auc_table(
        {
            "LIDC only": [0.6, 0.7, 0.8],
            "w/o pre-training": [0.55, 0.69, 0.46],
            "w/ pre-training": [0.78, 0.74, 0.49],
        }
    )
    assert list(table.index) == REGIMES and table.index.name == "AUC"
    assert list(table.columns) == ["fold 1", "fold 2", "fold 3", "average"]
    assert table.loc["w/ pre-training", "average"] == pytest.approx(0.67)  # the thesis's row


def test_confusion_table_counts_and_totals():
    # The thesis's "w/ pre-training" matrix: 22 / 15 / 12 / 24 (rows: predictions).
    y_true = np.array([0] * 22 + [1] * 15 + [0] * 12 + [1] * 24)
    y_prob = np.array([0.2] * 37 + [0.5] * 36)  # 0.5 counts as malignant
    table = confusion_table(y_true, y_prob)
    assert table.loc["Predictions Benign"].tolist() == [22, 15, 37]
    assert table.loc["Predictions Malignant"].tolist() == [12, 24, 36]
    assert table.loc["Total"].tolist() == [34, 39, 73]
    assert table.columns.name == "True diagnosis"


@pytest.mark.slow  # the fast tier starts no process and trains nothing
def test_store_of_the_wrong_kind(quick_cv, cv_stores, tmp_path, capsys):
    from lungbench.data.synth_mosmed import write_mosmed_store

    _, run_dir = quick_cv
    root = run_dir.parent
    store = tmp_path / "mosmed.h5"
    write_mosmed_store(store, 6, grid=(8, 16, 16))
    before = _run_dirs(root)
    code = main(["train", "lungx-cv", "--quick", "--store", str(store), "--out", str(root)])
    assert code == 2
    assert "needs inputs ['context', 'zoom']" in _message_of(capsys)
    code = main(
        [
            "train",
            "mosmed",
            "--quick",
            "--store",
            str(cv_stores[0]),
            "--out",
            str(root),
        ]
    )
    assert code == 2 and "needs inputs ['volume']" in _message_of(capsys)
    code = main(["train", "mosmed", "--store", str(store), "--out", str(root)])
    assert code == 2 and "too small" in _message_of(capsys)  # 8 voxels, valid padding
    assert _run_dirs(root) == before  # bad input leaves no run folder behind


@pytest.mark.slow  # the fast tier starts no process and trains nothing
def test_checkpoint_for_another_architecture_or_grid(quick_cv, tmp_path, capsys):
    _, run_dir = quick_cv
    root = run_dir.parent
    other = create_model("mosmed3d", filters=(2,), dense=4)
    path = save_checkpoint(
        tmp_path / "mosmed.pt",
        {
            "model_name": "mosmed3d",
            "model_kwargs": {"filters": [2], "dense": 4},
            "model": other.state_dict(),
        },
    )
    code = main(["train", "lungx-cv", "--quick", "--pretrained", str(path), "--out", str(root)])
    assert code == 2
    assert "checkpoint is for model 'mosmed3d'" in _message_of(capsys)
    kwargs = {"preset": "dey2018", "filters": 2, "depth": 2}
    dey = save_checkpoint(
        tmp_path / "dey.pt",
        {
            "model_name": "dualpath3d",
            "model_kwargs": kwargs,
            "model": create_model("dualpath3d", **kwargs).state_dict(),
        },
    )
    code = main(
        ["train", "lungx-cv", "--quick", "--synth-n", "6", "--pretrained", str(dey)]
        + ["--out", str(root)]
    )
    assert code == 2 and "'dey2018' grid" in _message_of(capsys)


@pytest.mark.slow  # the fast tier starts no process and trains nothing
def test_fold_count_larger_than_a_class(quick_cv, cv_stores, capsys):
    _, run_dir = quick_cv
    code = main(
        ["train", "lungx-cv", "--quick", "--store", str(cv_stores[0]), "--folds", "19"]
        + ["--out", str(run_dir.parent)]
    )
    assert code == 2
    assert "larger than the smallest class" in _message_of(capsys)


@pytest.mark.slow  # the fast tier starts no process and trains nothing
def test_resume_from_a_corrupt_checkpoint(quick_cv, tmp_path, capsys):
    _, run_dir = quick_cv
    root = run_dir.parent
    before, data_before = _run_dirs(root), set((root / "data").glob("*"))
    corrupt = tmp_path / "checkpoint_last.pt"
    corrupt.write_bytes(b"\x00" * 100)
    lidc = ["train", "lidc-pretrain", "--quick", "--out", str(root)]
    code = main([*lidc, "--resume", str(corrupt)])
    assert code == 2
    line = _message_of(capsys)
    assert str(corrupt) in line and "not a PyTorch checkpoint (not a zip archive)" in line
    torch.save({"format": "something-else"}, corrupt)
    code = main([*lidc, "--resume", str(corrupt)])
    assert code == 2 and "not a lungbench checkpoint" in _message_of(capsys)
    # Changed training options: rejected, listing each, before data or a run folder is made.
    last = run_dir / "lidc_pretrain" / "checkpoint_last.pt"
    code = main([*lidc, "--lr", "10", "--batch", "4", "--epochs", "5", "--resume", str(last)])
    line = _message_of(capsys)
    assert code == 2 and "lr 0.003 -> 10.0" in line and "batch_size 16 -> 4" in line
    assert _run_dirs(root) == before
    assert set((root / "data").glob("*")) == data_before  # no data generated either


def test_lidc_store_on_another_grid_is_rejected_before_pretraining(small_stores, tmp_path, capsys):
    lungx, _ = small_stores
    other = tmp_path / "lidc_default.h5"
    write_synthetic_store(other, "lidc", 4, geometry("default"), seed=2, workers=1)
    code = main(
        ["train", "lungx-cv", "--quick", "--store", str(lungx), "--lidc-store", str(other)]
        + ["--out", str(tmp_path / "out")]
    )
    assert code == 2 and "pre-train on the same grid" in _message_of(capsys)
    assert not (tmp_path / "out").exists() or not _run_dirs(tmp_path / "out")


def test_default_pretraining_store_is_on_the_lungx_grid_with_other_nodules(tmp_path, monkeypatch):
    import argparse

    import h5py

    from lungbench.commands.train import lungx_cv as command
    from lungbench.experiments import common3d, lidc_pretrain, lungx_cv

    # tiny n; lungx_cv reads lidc_pretrain.QUICK when it runs
    monkeypatch.setattr(lidc_pretrain, "QUICK", replace(lidc_pretrain.QUICK, synth_n=6))
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--quick", "--synth-n", "6", "--out", str(tmp_path)])
    cfg = command.make_config(args)
    lungx = lidc_pretrain.nodule_store(None, 6, "lungx", tmp_path, args.data_seed, "lungx-cv")
    lidc = lungx_cv.lidc_store(cfg, common3d.nodule_preset(lungx), tmp_path, args.data_seed)
    assert lidc.provenance["seed"] != lungx.provenance["seed"]
    with h5py.File(lungx.path, "r") as a, h5py.File(lidc.path, "r") as b:
        ours, theirs = a["context"][:], b["context"][:]
    for cube in ours:
        assert not any(np.array_equal(cube, other) for other in theirs)
    dey = lungx_cv.lidc_store(cfg, "dey2018", tmp_path, args.data_seed)  # the LUNGx grid
    assert common3d.nodule_preset(dey) == "dey2018"


@pytest.mark.slow
def test_mosmed_quick_compares_variants(tmp_path, capsys):
    code = main(
        [
            "train",
            "mosmed",
            "--quick",
            "--variants",
            "baseline",
            "avgpool",
            "double_conv",
            "--synth-n",
            "12",
            "--epochs",
            "1",
            "--out",
            str(tmp_path),
            "--run-id",
            "m",
            "--no-progress",
        ]
    )
    assert code == 0
    table = pd.read_csv(tmp_path / "m" / "tables" / "variants.csv", index_col=0)
    assert list(table.index) == ["baseline", "avgpool", "double_conv"]
    for column in ("val accuracy", "val AUC", "parameters", "time per epoch (s)"):
        assert table[column].notna().all(), column
    # On CPU an estimate that does not depend on what earlier variants left in the process:
    # every variant gets a figure, and a second conv per level needs more than one.
    memory = table["peak memory, estimated (MiB)"]
    assert (memory > 0).all(), memory.to_dict()
    assert memory["double_conv"] > memory["baseline"]
    assert set(table["memory measure"]) == {"estimated"}
    assert "peak memory estimated" in (tmp_path / "m" / "tables" / "variants.md").read_text()
    assert (tmp_path / "m" / "plots" / "val_auc.png").exists()
    out = capsys.readouterr().out
    assert "GENERATED" in out and "peak memory estimated" in out


def test_mosmed_memory_is_measured_on_cuda_and_estimated_on_cpu(tmp_path):
    import argparse
    from pathlib import Path

    from lungbench.commands.train import mosmed as command
    from lungbench.data.store import StoreInfo
    from lungbench.experiments import mosmed
    from lungbench.train.costs import estimate_memory

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    cfg = command.make_config(parser.parse_args(["--quick", "--out", str(tmp_path)]))
    info = StoreInfo(Path("x.h5"), "mosmed", "binary", 1, {"volume": (1, 16, 32, 32)}, {}, [])
    model = create_model("mosmed3d", **cfg.model_kwargs("baseline"))
    cuda = mosmed.training_memory(cfg, model, info, 12345, "cuda_max_allocated")
    assert cuda == (12345, "cuda_max_allocated")
    bytes_, kind = mosmed.training_memory(cfg, model, info, 0, "cpu_rss_above_start")
    expected = estimate_memory(model, [(1, 16, 32, 32)], "adam").total(cfg.train.batch_size)
    assert (bytes_, kind) == (expected, "estimated")
    assert "measured" in mosmed.MEMORY_COLUMNS["cuda_max_allocated"]
    assert "estimated" in mosmed.MEMORY_COLUMNS["estimated"]


def test_mosmed_full_defaults_can_stop_early_or_run_all_epochs():
    from lungbench.experiments import mosmed

    patience = mosmed.FULL.train.patience
    assert patience is None or patience < mosmed.FULL.train.epochs


def _cv_config(tmp_path, *argv):
    import argparse

    from lungbench.commands.train import lungx_cv as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.make_config(parser.parse_args([*argv, "--out", str(tmp_path)]))


def test_lungx_cv_folds_follow_seed_on_the_generated_store(tmp_path):
    import shutil

    from lungbench.data.splits import store_folds, stored_folds
    from lungbench.data.store import read_info
    from lungbench.experiments import lidc_pretrain, lungx_cv

    info = lidc_pretrain.nodule_store(None, 12, "lungx", tmp_path, 0, "lungx-cv")

    def folds(*argv):
        cfg = _cv_config(tmp_path, "--quick", "--synth-n", "12", *argv)
        return lungx_cv.fold_assignment(cfg, info)

    first, how = folds("--seed", "0")
    assert how == "stratified 3-fold, seed 0"
    other, _ = folds("--seed", "1")
    again, _ = folds("--seed", "0")
    assert not np.array_equal(first, other)  # another seed, other folds on the same store
    assert np.array_equal(first, again)
    assert stored_folds(info.path, 3) is None  # the shared cache keeps no folds
    # A user's store keeps the folds it stores, whatever --seed.
    user = tmp_path / "user.h5"
    shutil.copy(info.path, user)
    saved = store_folds(user, 3, seed=7)
    cfg = _cv_config(tmp_path, "--quick", "--store", str(user), "--seed", "1")
    got, how = lungx_cv.fold_assignment(cfg, read_info(user))
    assert np.array_equal(got, saved) and how.startswith("stored in")


def test_lungx_cv_write_folds_needs_a_store(tmp_path, capsys):
    code = main(["train", "lungx-cv", "--quick", "--write-folds", "--out", str(tmp_path)])
    assert code == 2 and "--write-folds needs --store" in _message_of(capsys)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_failure_after_the_run_folder_is_marked_failed(small_stores, tmp_path, monkeypatch):
    from lungbench.experiments import lidc_pretrain

    def broken(*args, **kwargs):
        raise RuntimeError("disk full\nmore detail")

    monkeypatch.setattr(lidc_pretrain, "pretrain", broken)
    argv = ["train", "lidc-pretrain", "--quick", "--store", str(small_stores[1])]
    with pytest.raises(RuntimeError):
        main([*argv, "--out", str(tmp_path), "--run-id", "lp", "--no-progress"])
    info = json.loads((tmp_path / "lp" / "run.json").read_text())
    assert (info["status"], info["error"]) == ("failed", "disk full")


@pytest.mark.timeout(480)  # above its own subprocess limits, which say what hung
@pytest.mark.distributed
def test_lidc_pretrain_under_torchrun_trains_with_ddp(tmp_path):
    """Two Gloo processes: rank 0 generates the data, one run folder with a complete DDP
    run, metrics for every epoch, and one printed summary."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "lungbench",
            "train",
            "lidc-pretrain",
            "--quick",
            "--epochs",
            "2",
            "--synth-n",
            "24",
            "--out",
            str(out),
            "--run-id",
            "ddp",
            "--no-progress",
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results: ") == 1
    assert "DDP x2 (gloo)" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["data", "ddp"]
    run = out / "ddp"
    assert read_json(run / "run.json")["status"] == "complete"
    assert read_json(run / "config.json")["distributed"]["world_size"] == 2
    assert len(pd.read_csv(run / "metrics.csv")) == 2
    assert (run / "checkpoint_best.pt").exists()

    # Resumed under the launcher (a requeued job): every rank continues from the checkpoint.
    resumed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + ["-m", "lungbench", "train", "lidc-pretrain", "--quick", "--epochs", "3"]
        + ["--synth-n", "24", "--out", str(out), "--run-id", "ddp-resumed", "--no-progress"]
        + ["--resume", str(run / "checkpoint_last.pt"), "--dist-timeout", "60"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = pd.read_csv(out / "ddp-resumed" / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3]  # epochs 1-2 from the checkpoint's history


@pytest.mark.parametrize("experiment", ["lungx-cv", "mosmed", "chestxray", "nodule2d"])
def test_single_process_experiments_refuse_a_launcher(experiment, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LUNGBENCH_LAUNCHER", raising=False)
    assert main(["train", experiment, "--quick", "--out", str(tmp_path)]) == 2
    line = _message_of(capsys)
    assert f"lungbench train {experiment}: runs in one process; torchrun started 2" in line
    assert "lidc-pretrain" in line  # where DDP training is
    assert list(tmp_path.iterdir()) == []
