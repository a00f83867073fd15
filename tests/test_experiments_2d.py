"""`lungbench train chestxray` and `nodule2d` end to end on tiny generated data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from lungbench.cli import main
from lungbench.data.store import StoreWriter
from lungbench.data.synth2d import write_chestxray_store
from lungbench.experiments import chestxray, nodule2d
from lungbench.models import create_model


@pytest.fixture(scope="module")
def cxr_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("cxr") / "cxr.h5"
    write_chestxray_store(
        path,
        20,
        seed=1,
        size=32,
        findings=["Infiltration", "Effusion", "Nodule"],
        prevalence_scale=2,
    )
    return path


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "source.pt"
    torch.save(create_model("resnet18", in_channels=1).state_dict(), path)
    return path


def _chestxray(cxr_store, out, *extra):
    return main(
        [
            "train",
            "chestxray",
            "--quick",
            "--store",
            str(cxr_store),
            "--model",
            "resnet18",
            "--out",
            str(out),
            *extra,
        ]
    )


@pytest.mark.slow
def test_quick_cross_validation_writes_both_tables(tmp_path, cxr_store, resnet18_weights):
    code = _chestxray(
        cxr_store,
        tmp_path / "res",
        "--methods",
        "A",
        "D",
        "--weights",
        f"src={resnet18_weights}",
        "--folds",
        "2",
        "--cost-samples",
        "4",
        "--cost-epochs",
        "1",
        "--save-models",
        "--run-id",
        "link2",
    )
    assert code == 0
    run = tmp_path / "res" / "link2"
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert (run / "config.json").exists() and (run / "environment.json").exists()
    folds = pd.read_csv(run / "tables" / "folds.csv")
    assert sorted(folds["method"].unique()) == ["A", "D"]
    assert folds.groupby("method")["fold"].nunique().eq(2).all()
    # The folds partition the 20 images; validation comes out of each training part.
    assert folds.groupby("method")["n_test"].sum().eq(20).all()
    assert (folds["n_train"] + folds["n_val"] + folds["n_test"]).eq(20).all()
    for metric in ("binary_accuracy", "auc"):
        table = pd.read_csv(run / "tables" / f"methods_{metric}.csv", index_col=0)
        assert list(table.columns) == ["A", "D"]
        assert list(table.index) == ["src", "none (random init)"]
        assert "(+/-" in table.loc["src", "A"] and "(+/-" in table.loc["none (random init)", "D"]
        assert (run / "tables" / f"methods_{metric}.md").exists()
    cost = pd.read_csv(run / "tables" / "cost_resnet18.csv")
    assert list(cost["method"]) == ["A", "C/D"]
    assert cost["trainable_parameters"].iloc[0] == 512 * 3 + 3
    assert (
        cost["trainable_parameters"].iloc[1] == 11_182_851
    )  # resnet18, RGB, keras_compat, 3 outputs
    assert (cost["time_per_epoch_s"] > 0).all()
    # --save-models keeps each fold's model: the next link of a weight chain.
    saved = sorted(p.name for p in (run / "models").iterdir())
    assert saved == [
        "none-random-init_D_fold1.pt",
        "none-random-init_D_fold2.pt",
        "src_A_fold1.pt",
        "src_A_fold2.pt",
    ]


@pytest.mark.slow
def test_weight_chain_from_an_earlier_runs_saved_model(tmp_path, cxr_store, resnet18_weights):
    """source weights -> run 1 (C, --save-models) -> run 2 starts from run 1's fold model;
    run 2's records carry the whole chain."""
    common = ["--methods", "C", "--folds", "2", "--cost-samples", "4", "--cost-epochs", "1"]
    first = [*common, "--weights", f"src={resnet18_weights}", "--save-models"]
    assert _chestxray(cxr_store, tmp_path / "res", *first, "--run-id", "one") == 0
    link = tmp_path / "res" / "one" / "models" / "src_C_fold1.pt"
    chained = [*common, "--weights", f"CXR={link}", "--run-id", "two"]
    assert _chestxray(cxr_store, tmp_path / "res", *chained) == 0
    records = [json.loads(line) for line in (tmp_path / "res" / "two" / "records.jsonl").open()]
    chains = {tuple(r["weights_chain"]) for r in records if r.get("kind") == "fold"}
    assert chains == {(str(resnet18_weights), str(link))}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--labels", "Hernia"], "not in the label list"),
        (["--freeze", "99"], "does not exist"),
        (["--weights", "nonsense"], "NAME=PATH"),
        (["--weights", "x=/nonexistent.pth"], "not found"),
        (["--weights", "x=OTHER_NET"], "do not fit"),
        (["--folds", "1"], "--folds must be >= 2"),
        (["--folds", "21"], "more than the 20 images"),
        (["--methods", "E"], "transfer method"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_the_run_folder(
    tmp_path, cxr_store, capsys, extra, message
):
    other = tmp_path / "conv.pt"
    torch.save(nn.Conv2d(1, 2, 3).state_dict(), other)
    extra = [e.replace("OTHER_NET", str(other)) for e in extra]
    code = _chestxray(cxr_store, tmp_path / "res", *extra)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and message in err
    assert not (tmp_path / "res").exists()  # no run folder, no generated data


def test_chestxray_failure_after_the_run_folder_marks_it_failed(
    tmp_path, cxr_store, resnet18_weights, monkeypatch
):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(chestxray, "cross_validate", broken)
    with pytest.raises(RuntimeError):
        _chestxray(cxr_store, tmp_path / "res", "--weights", f"src={resnet18_weights}")
    run = json.loads(next((tmp_path / "res").iterdir()).joinpath("run.json").read_text())
    assert run["status"] == "failed" and run["error"] == "disk on fire"


def test_fold_strata_keep_no_finding_and_merge_rare_findings():
    labels = np.array(
        [[1, 0, 0]] * 6  # finding 0 alone: its own stratum
        + [[1, 1, 0]] * 4  # finding 1 is rarer than 0: stratum 1
        + [[0, 0, 1]]  # finding 2 once: too rare, merged into the largest stratum
        + [[0, 0, 0]] * 5  # no finding: stratum 3 (= the number of findings)
    )
    strata = chestxray.fold_strata(labels, folds=2)
    assert strata.min() >= 0
    assert strata.tolist() == [0] * 6 + [1] * 4 + [0] + [3] * 5
    # Five folds: finding 1 (4 images) cannot be in every test fold either.
    assert chestxray.fold_strata(labels, folds=5).tolist() == [0] * 11 + [3] * 5


def _write_image_store(path, inputs, task="binary", names=("benign", "malignant")):
    with StoreWriter(path, kind="test", inputs=inputs, label_names=names, task=task) as w:
        for i in range(12):
            arrays = {k: np.zeros(shape, np.int16) for k, shape in inputs.items()}
            w.append(arrays, label=i % 2, id=f"s{i}", spacing=(1, 1, 1))


def test_nodule2d_checks_options_before_the_run_folder(tmp_path, capsys):
    code = main(["train", "nodule2d", "--quick", "--lr-iters", "3", "--out", str(tmp_path / "r")])
    assert code == 2 and "at least 5 steps" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"context": (1, 4, 4, 4), "zoom": (1, 4, 4, 4)}, "needs inputs ['image']"),
        ({"image": (1, 4, 32, 32)}, "one 2D input 'image'"),
    ],
)
def test_nodule2d_rejects_non_image_stores(tmp_path, capsys, inputs, message):
    store = tmp_path / "other.h5"
    _write_image_store(store, inputs)
    code = main(
        ["train", "nodule2d", "--quick", "--store", str(store), "--out", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and message in err and str(store) in err and "'test'" in err
    assert not (tmp_path / "r").exists()


NODULE2D_QUICK = [
    "train",
    "nodule2d",
    "--quick",
    "--n",
    "30",
    "--image-size",
    "32",
    "--epochs",
    "1",
    "--batch",
    "8",
    "--tta",
    "identity",
    "hflip",
]


@pytest.mark.slow
def test_nodule2d_quick(tmp_path):
    code = main([*NODULE2D_QUICK, "--method", "A", "--lr-iters", "5", "--out", str(tmp_path)])
    assert code == 0
    run = next(tmp_path.iterdir())
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    plots = ("lr_finder", "loss", "gradcam", "confusion_matrix", "most_uncertain")
    for plot in plots:
        assert (run / "plots" / f"{plot}.png").exists(), plot
    assert (run / "train" / "checkpoint_best.pt").exists()
    config = json.loads((run / "config.json").read_text())
    assert config["lr_finder"]["suggestion"] == config["nodule2d"]["train"]["lr"]
    accuracy = pd.read_csv(run / "tables" / "accuracy.csv")
    assert list(accuracy["prediction"]) == ["plain", "TTA (2 views)"]
    assert accuracy["n_test"].eq(3).all()  # 10% of 30 crops
    # The thesis's layout: predictions in rows, the true diagnosis in columns.
    confusion = pd.read_csv(run / "tables" / "confusion_matrix.csv", index_col=0)
    assert list(confusion.index) == ["Predictions benign", "Predictions malignant", "Total"]
    assert list(confusion.columns) == ["benign", "malignant", "Total"]
    assert confusion.loc["Total", "Total"] == 3


def test_nodule2d_given_lr_skips_the_finder(tmp_path, monkeypatch):
    def no_finder(*args, **kwargs):
        raise AssertionError("the LR finder ran although --lr was given")

    def stop(*args, **kwargs):
        raise RuntimeError("stop after the finder")

    monkeypatch.setattr(nodule2d, "find_lr", no_finder)
    monkeypatch.setattr(nodule2d, "fit", stop)
    with pytest.raises(RuntimeError, match="stop after"):
        main([*NODULE2D_QUICK, "--lr", "1e-3", "--out", str(tmp_path)])
    run = next(tmp_path.iterdir())
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    config = json.loads((run / "config.json").read_text())
    assert config["lr_finder"] is None and config["nodule2d"]["train"]["lr"] == 1e-3
    assert not (run / "plots" / "lr_finder.png").exists()


def test_cam_share_on_the_nodule():
    """The Grad-CAM measure of tables/gradcam_nodule: a map spread evenly has a lift of 1, a
    map inside the nodule disc 1 / the disc's share of the crop; a flat map is NaN."""
    masks = nodule2d.nodule_masks((16, 16), np.array([4.0, 4.0, 4.0]), margin=0.0)
    assert masks.shape == (3, 16, 16) and masks[0].sum() == 12  # radius 2 about (7.5, 7.5)
    cams = np.stack([np.ones((16, 16)), masks[1].astype(float), np.zeros((16, 16))])
    table = nodule2d.cam_on_masks(cams, masks)
    area = 12 / 256
    assert table["nodule_share_of_crop"].tolist() == pytest.approx([area] * 3)
    assert table["lift"].iloc[0] == pytest.approx(1.0)
    assert table["lift"].iloc[1] == pytest.approx(1 / area)
    assert table["peak_in_nodule"].iloc[1] == 1.0
    assert np.isnan(table["lift"].iloc[2]) and np.isnan(table["peak_in_nodule"].iloc[2])


def test_case_indices_pick_right_wrong_and_uncertain_cases():
    targets = np.array([1, 1, 0, 0, 1, 0])
    probs = np.array([0.95, 0.20, 0.10, 0.90, 0.55, 0.40])
    cases = nodule2d.case_indices(probs, targets, k=2)
    # Surest right: 0 (0.95 for a malignant one), then 2 (0.90 for a benign one).
    assert cases["most_correct"].tolist() == [0, 2]
    assert cases["most_incorrect"].tolist() == [3, 1]  # 0.90 for a benign one, then 0.20
    assert cases["most_uncertain"].tolist() == [4, 5]  # 0.55 and 0.40
    assert nodule2d.case_indices(probs, targets, k=10)["most_incorrect"].tolist() == [3, 1]
