"""`lungbench train chestxray` and `nodule2d` end to end on tiny generated data."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from lungbench.cli import main
from lungbench.data.synth2d import write_chestxray_store
from lungbench.models import create_model


@pytest.fixture(scope="module")
def cxr_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("cxr") / "cxr.h5"
    write_chestxray_store(
        path,
        25,
        seed=1,
        size=32,
        findings=["Infiltration", "Effusion", "Nodule"],
        prevalence_scale=2,
    )
    return path


@pytest.mark.slow
def test_quick_five_fold_run_writes_both_tables(tmp_path, cxr_store):
    weights = tmp_path / "source.pt"
    torch.save(create_model("resnet18", in_channels=1).state_dict(), weights)
    code = main(
        [
            "train",
            "chestxray",
            "--quick",
            "--store",
            str(cxr_store),
            "--model",
            "resnet18",
            "--methods",
            "A",
            "D",
            "--weights",
            f"src={weights}",
            "--cost-samples",
            "8",
            "--cost-epochs",
            "2",
            "--out",
            str(tmp_path / "res"),
        ]
    )
    assert code == 0
    run = next((tmp_path / "res").iterdir())
    folds = pd.read_csv(run / "tables" / "folds.csv")
    assert sorted(folds["method"].unique()) == ["A", "D"]
    assert folds.groupby("method")["fold"].nunique().eq(5).all()
    acc = pd.read_csv(run / "tables" / "methods_binary_accuracy.csv", index_col=0)
    assert list(acc.columns) == ["A", "D"] and "src" in acc.index
    assert "(+/-" in acc.loc["src", "A"]
    assert (run / "tables" / "methods_auc.md").exists()
    cost = pd.read_csv(run / "tables" / "cost_resnet18.csv")
    assert list(cost["method"]) == ["A", "C/D"]
    assert cost["trainable_parameters"].iloc[0] == 512 * 3 + 3
    assert (
        cost["trainable_parameters"].iloc[1] == 11_182_851
    )  # resnet18, RGB, keras_compat, 3 outputs
    assert (cost["time_per_epoch_s"] > 0).all()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--labels", "Hernia"], "not in the label list"),
        (["--freeze", "99"], "does not exist"),
        (["--weights", "nonsense"], "NAME=PATH"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, cxr_store, capsys, extra, message):
    code = main(
        [
            "train",
            "chestxray",
            "--quick",
            "--store",
            str(cxr_store),
            "--model",
            "resnet18",
            "--out",
            str(tmp_path),
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and message in err


@pytest.mark.slow
def test_nodule2d_quick(tmp_path):
    code = main(
        [
            "train",
            "nodule2d",
            "--quick",
            "--n",
            "30",
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--lr-iters",
            "6",
            "--batch-size",
            "8",
            "--tta",
            "identity",
            "hflip",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    run = next(tmp_path.iterdir())
    for plot in ("lr_finder", "loss", "gradcam", "confusion_matrix", "most_uncertain"):
        assert (run / "plots" / f"{plot}.png").exists(), plot
    confusion = pd.read_csv(run / "tables" / "confusion_matrix.csv", index_col=0)
    assert confusion.loc["total", "total"] == 3  # 10% of 30 crops
