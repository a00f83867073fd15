"""The seeds' published tables (results/reference/) and `lungbench report` putting them beside ours.

Every reference file parses in its layout with its published numbers; for each recipe a fake
run folder holding the tables the recipe writes gets a report with the published tables
beside ours; a missing or malformed reference gives a note and a warning, never a traceback.

    python -m pytest tests/test_reference.py -q
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lungbench.cli import main
from lungbench.core.runs import create_run_dir, finish_run, write_json, write_table
from lungbench.experiments import common2d
from lungbench.report.beside import summary_table
from lungbench.report.html import write_report
from lungbench.report.reference import INDEX_FILE, load_references, run_models
from lungbench.report.runview import load_run
from lungbench.report.training import auc_table, confusion_table, transfer_table

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference"
WEIGHTS = ["ImageNet", "ChestX-ray8", "ImageNet (F) + ChestX-ray8", "ImageNet (I) + ChestX-ray8"]

# file -> (first column, the other columns, the row labels): the layout of each reference.
LAYOUTS = {
    "seed000_speedup_b2.csv": (
        "Batch size = 2",
        [
            "Filters = 8 | Exec. time (s)",
            "Filters = 8 | Speed-up",
            "Filters = 16 | Exec. time (s)",
            "Filters = 16 | Speed-up",
        ],
        ["acer-1", "M100 (1 GPU)", "M100 (4 GPUs)", "Lb7"],
    ),
    "seed000_auc.csv": (
        "AUC",
        ["fold 1", "fold 2", "fold 3", "average"],
        ["LIDC only", "w/o pre-training", "w/ pre-training"],
    ),
    **{
        f"seed000_confusion_{regime}.csv": (
            "",
            ["Benign", "Malignant", "Total"],
            ["Predictions Benign", "Predictions Malignant", "Total"],
        )
        for regime in ("lidc_only", "without_pretraining", "with_pretraining")
    },
    "seed000_pretrain_summary.csv": (
        "run",
        ["best epoch", "val accuracy", "val AUC"],
        ["LIDC pre-training"],
    ),
    "seed001_accuracy.csv": (
        "prediction",
        ["test_accuracy", "n_test"],
        [
            "TTA (last layers, rotation augmentation, cosine annealing, 200 epochs)",
            "TTA (last layers, no augmentation)",
            "whole network after the last layers (TTA not stated)",
        ],
    ),
    "seed002_variants.csv": (
        "variant",
        ["seed 002 item", "modification (seed 002's words)"],
        [
            "baseline",
            "dense100",
            "double_conv",
            "sigmoid",
            "avgpool",
            "residual",
            "res_inception",
        ],
    ),
    **{
        f"seed004_methods_{metric}_resnet50.csv": ("pretrained weights", ["A", "B", "C"], WEIGHTS)
        for metric in ("binary_accuracy", "auc")
    },
    **{
        f"seed004_methods_{metric}_densenet121.csv": (
            "pretrained weights",
            ["A", "B", "C"],
            ["ImageNet", "ImageNet (F) + ChestX-ray8"],
        )
        for metric in ("binary_accuracy", "auc")
    },
    **{
        f"seed004_frozen_{metric}_resnet50.csv": (
            "pretrained weights",
            ["B_10", "B_22", "B_40"],
            ["ChestX-ray8", "ImageNet (I) + ChestX-ray8", "ImageNet"],
        )
        for metric in ("binary_accuracy", "auc")
    },
    **{
        f"seed004_transfer_{model}.csv": (
            "transfer learning",
            ["Binary Accuracy", "AUC"],
            ["Without Transfer Learning", "With Transfer Learning"],
        )
        for model in ("resnet50", "densenet121")
    },
    "seed004_cost_resnet50.csv": (
        "method",
        ["batch_size", "min_gpus", "time_per_epoch_s", "trainable_parameters"],
        ["A", "B_40", "B_22", "B_10", "C/D"],
    ),
    "seed004_cost_densenet121.csv": (
        "method",
        ["batch_size", "min_gpus", "time_per_epoch_s", "trainable_parameters"],
        ["A", "B_88", "B_39", "B_14", "C/D"],
    ),
}

# (file, row, column, the text as published): a few cells of each table, checked exactly.
PUBLISHED = [
    ("seed000_speedup_b2.csv", "M100 (1 GPU)", "Filters = 16 | Speed-up", "317"),
    ("seed000_pretrain_summary.csv", "LIDC pre-training", "best epoch", "63"),
    ("seed000_pretrain_summary.csv", "LIDC pre-training", "val accuracy", "0.78"),
    ("seed000_pretrain_summary.csv", "LIDC pre-training", "val AUC", "0.9"),
    ("seed001_accuracy.csv", LAYOUTS["seed001_accuracy.csv"][2][0], "test_accuracy", "0.95"),
    (
        "seed002_variants.csv",
        "avgpool",
        "modification (seed 002's words)",
        "Change MaxPooling by AveragePooling",
    ),  # fmt: skip
    ("seed004_methods_binary_accuracy_resnet50.csv", "ImageNet", "C", "87.30% (+/- 13.96%)"),
    ("seed004_methods_auc_resnet50.csv", "ImageNet", "C", "91.07% (+/- 12.3%)"),
    ("seed004_methods_auc_resnet50.csv", "ImageNet (F) + ChestX-ray8", "A", "50.1% (+/- 1.03%)"),
    ("seed004_methods_binary_accuracy_densenet121.csv", "ImageNet", "B", "95.07% (+/- 0.02%)"),
    (
        "seed004_methods_auc_densenet121.csv",
        "ImageNet (F) + ChestX-ray8",
        "C",
        "78.44% (+/- 10.86%)",
    ),  # fmt: skip
    ("seed004_frozen_binary_accuracy_resnet50.csv", "ImageNet", "B_22", "82.80% (+/- 8.13%)"),
    ("seed004_frozen_auc_resnet50.csv", "ChestX-ray8", "B_40", "49.62% (+/- 1.72%)"),
    ("seed004_transfer_resnet50.csv", "With Transfer Learning", "AUC", "91.07% (+/- 12.3%)"),
    (
        "seed004_transfer_densenet121.csv",
        "Without Transfer Learning",
        "Binary Accuracy",
        "65.72% (+/- 18.12%)",
    ),  # fmt: skip
    ("seed004_cost_resnet50.csv", "B_22", "time_per_epoch_s", "3762"),
    ("seed004_cost_resnet50.csv", "C/D", "trainable_parameters", "23561229"),
    ("seed004_cost_densenet121.csv", "C/D", "time_per_epoch_s", "10884"),
    ("seed004_cost_densenet121.csv", "C/D", "trainable_parameters", "6967181"),
]


# ----------------------------------------------------------------------------- the files


@pytest.fixture(scope="module")
def references():
    return load_references(REFERENCE)


def test_the_folder_reads_without_problems_and_every_file_has_a_source(references):
    assert references.problems == []
    names = {r.path.name for r in references.references}
    assert names == set(LAYOUTS), "every reference file is listed in LAYOUTS (and the reverse)"
    index = pd.read_csv(REFERENCE / INDEX_FILE, dtype=str, keep_default_na=False)
    assert sorted(index["file"]) == sorted(LAYOUTS), "index.csv lists every file once"
    for ref in references.references:
        assert re.match(r"seed 00\d, (slide|section) ", ref.source), ref.path.name


def test_the_reference_files_are_tracked_by_git():
    ignore = (REFERENCE.parents[1] / ".gitignore").read_text().splitlines()
    assert "/results/*" in ignore and "!/results/reference/" in ignore


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_reference_file_parses_in_its_layout(references, name):
    ref = next(r for r in references.references if r.path.name == name)
    first, columns, rows = LAYOUTS[name]
    assert ref.problem == "" and ref.frame is not None
    assert list(ref.frame.columns) == [first, *columns]
    assert ref.frame.iloc[:, 0].tolist() == rows


@pytest.mark.parametrize(("name", "row", "column", "value"), PUBLISHED)
def test_published_numbers_exactly(references, name, row, column, value):
    frame = next(r for r in references.references if r.path.name == name).frame
    cell = frame.set_index(frame.columns[0]).loc[row, column]
    assert cell == value


def test_seed004_cells_carry_mean_and_std_in_percent(references):
    cell = re.compile(r"^\d{1,3}\.\d{1,2}% \(\+/- \d{1,2}\.\d{1,2}%\)$")
    tables = [r for r in references.references if r.seed == "seed004" and "cost" not in r.path.name]
    assert len(tables) >= 4, "the method, AUC and transfer tables of both networks"
    for ref in tables:
        values = ref.frame.iloc[:, 1:].to_numpy().ravel()
        assert all(cell.match(v) for v in values), (ref.path.name, values)


# ----------------------------------------------------------------------------- fake runs


def _run(tmp_path: Path, run_id: str, config: dict, argv: list[str]) -> Path:
    """A complete run folder of kind argv[0] with `config` as its config.json."""
    run = create_run_dir(tmp_path, argv[0], run_id)
    write_json(run / "config.json", config)
    finish_run(run, argv=argv)
    return run


def bench_run(tmp_path: Path) -> Path:
    run = _run(tmp_path, "bench-fake", {"request": {"batch_sizes": [2]}}, ["bench"])
    table = pd.DataFrame(
        {
            "Filters = 8 | Exec. time (s)": [6.94],
            "Filters = 8 | Speed-up": [np.nan],
            "Filters = 16 | Exec. time (s)": [10.34],
            "Filters = 16 | Speed-up": [np.nan],
        },
        index=pd.Index(["cpu (2 threads)"], name="Batch size = 2"),
    )
    write_table(run, "speedup_b2", table)
    return run


def _pretrain_summary() -> pd.DataFrame:
    """As lidc_pretrain.pretrain writes it."""
    return pd.DataFrame(
        [
            {
                "best epoch": 3,
                "val loss": 0.61,
                "val accuracy": 0.7133,
                "val AUC": 0.8021,
                "epochs run": 3,
                "train nodules": 603,
                "val nodules": 151,
                "time per epoch (s)": 7.5,
                "samples/s": 80.4,
            }
        ],
        index=pd.Index(["LIDC pre-training"], name="run"),
    )


def lidc_pretrain_run(tmp_path: Path) -> Path:
    run = _run(tmp_path, "lidc-fake", {"experiment": "lidc-pretrain"}, ["train", "lidc-pretrain"])
    write_table(run, "pretrain_summary", _pretrain_summary())
    return run


def lungx_cv_run(tmp_path: Path) -> Path:
    run = _run(tmp_path, "lungx-fake", {"experiment": "lungx-cv"}, ["train", "lungx-cv"])
    aucs = {
        "LIDC only": [0.61, 0.58, 0.66],
        "w/o pre-training": [0.52, 0.64, 0.5],
        "w/ pre-training": [0.7, 0.72, 0.55],
    }
    write_table(run, "auc", auc_table(aucs))
    rng = np.random.default_rng(0)
    labels = np.array([0] * 37 + [1] * 36)
    for regime in ("lidc_only", "without_pretraining", "with_pretraining"):
        write_table(run, f"confusion_{regime}", confusion_table(labels, rng.random(73)))
    write_table(run, "pretrain_summary", _pretrain_summary())
    return run


def mosmed_run(tmp_path: Path) -> Path:
    run = _run(tmp_path, "mosmed-fake", {"experiment": "mosmed"}, ["train", "mosmed"])
    variants = ["baseline", "dense100", "double_conv", "sigmoid", "avgpool", "residual"]
    rows = [
        {
            "variant": v,
            "best epoch": 2,
            "val accuracy": 0.6 + 0.01 * i,
            "val AUC": 0.65 + 0.01 * i,
            "val loss": 0.68,
            "parameters": 100_000 + i,
            "time per epoch (s)": 3.2,
            "samples/s": 7.1,
            "peak memory, estimated (MiB)": 120.5,
            "memory measure": "estimated",
        }
        for i, v in enumerate(variants)
    ]
    write_table(run, "variants", pd.DataFrame(rows).set_index("variant"))
    return run


def _chestxray(tmp_path: Path, run_id: str, model: str, depths: tuple[int, ...]) -> Path:
    """What chestxray._experiment writes: folds, the methods x weights tables, the cost table."""
    run = _run(tmp_path, run_id, {"chestxray": {"model": model}}, ["train", "chestxray"])
    methods = ["A", *(f"B_{d}" for d in depths), "C"]
    sources = ["ImageNet", "ChestX-ray8"]
    rng = np.random.default_rng(1)
    rows = [
        {
            "weights": s,
            "method": m,
            "fold": k,
            "binary_accuracy": rng.uniform(0.5, 0.9),
            "auc": rng.uniform(0.45, 0.95),
        }
        for s in sources
        for m in methods
        for k in (1, 2, 3, 4, 5)
    ]
    rows += [
        {
            "weights": "none (random init)",
            "method": "D",
            "fold": k,
            "binary_accuracy": 0.6,
            "auc": 0.55,
        }
        for k in (1, 2, 3, 4, 5)
    ]
    folds = pd.DataFrame(rows)
    write_table(run, "folds", folds, index=False)
    for metric in ("binary_accuracy", "auc"):
        table = common2d.methods_table(folds, metric, methods, sources)
        table["D"] = ""
        d_rows = folds[folds["method"] == "D"]
        table.loc["none (random init)"] = [""] * len(methods) + [
            common2d.mean_std_cell(d_rows[metric].tolist())
        ]
        write_table(run, f"methods_{metric}", table)
    cost = pd.DataFrame(
        {
            "method": ["A", *(f"B_{d}" for d in depths), "C/D"],
            "batch_size": 16,
            "min_gpus": 1,
            "time_per_epoch_s": np.linspace(1.0, 2.0, len(depths) + 2),
            "trainable_parameters": np.arange(len(depths) + 2) * 1000 + 26637,
            "peak_memory_mib": 900.0,
            "memory_kind": "estimated",
            "per_sample_activations_mib": 12.5,
            "epochs_timed": 2,
        }
    )
    write_table(run, f"cost_{model}", cost, index=False)
    return run


def chestxray_run(tmp_path: Path) -> Path:
    return _chestxray(tmp_path, "cxr-fake", "resnet50", (10, 22, 40))


def chestxray_densenet_run(tmp_path: Path) -> Path:
    return _chestxray(tmp_path, "cxr-dense-fake", "densenet121", (14, 39, 88))


def chestxray_quick_run(tmp_path: Path) -> Path:
    return _chestxray(tmp_path, "cxr-quick-fake", "resnet18", (5, 9))


def nodule2d_run(tmp_path: Path) -> Path:
    run = _run(tmp_path, "n2d-fake", {"nodule2d": {"model": "resnet18"}}, ["train", "nodule2d"])
    write_table(run, "history", pd.DataFrame({"epoch": [1, 2], "train_loss": [0.7, 0.5]}), False)
    accuracy = pd.DataFrame(
        {"prediction": ["plain", "TTA (4 views)"], "test_accuracy": [0.8731, 0.8806], "n_test": 67}
    )
    write_table(run, "accuracy", accuracy, index=False)
    labels = np.array([0, 1] * 20)
    confusion = confusion_table(labels, np.linspace(0, 1, 40), class_names=("benign", "malignant"))
    write_table(run, "confusion_matrix", confusion)
    return run


# recipe -> (fake run, [(our table, published file, a published cell, one of our cells)])
RECIPES = {
    "bench": (bench_run, [("speedup_b2", "seed000_speedup_b2.csv", "1194.03", "6.94")]),
    "lidc-pretrain": (
        lidc_pretrain_run,
        [("pretrain_summary", "seed000_pretrain_summary.csv", "63", "0.7133")],
    ),
    "lungx-cv": (
        lungx_cv_run,
        [
            ("auc", "seed000_auc.csv", "0.67", "0.72"),
            ("confusion_lidc_only", "seed000_confusion_lidc_only.csv", "29", "Predictions Benign"),
            (
                "confusion_without_pretraining",
                "seed000_confusion_without_pretraining.csv",
                "54",
                "Total",
            ),  # fmt: skip
            ("confusion_with_pretraining", "seed000_confusion_with_pretraining.csv", "39", "73"),
            ("pretrain_summary", "seed000_pretrain_summary.csv", "63", "0.7133"),
        ],
    ),
    "mosmed": (
        mosmed_run,
        [
            (
                "variants",
                "seed002_variants.csv",
                "Change ReLu activation functions by Sigmoids",
                "double_conv",
            )
        ],  # fmt: skip
    ),
    "chestxray": (
        chestxray_run,
        [
            (
                "methods_binary_accuracy",
                "seed004_methods_binary_accuracy_resnet50.csv",
                "87.30% (+/- 13.96%)",
                "none (random init)",
            ),  # fmt: skip
            (
                "methods_binary_accuracy",
                "seed004_frozen_binary_accuracy_resnet50.csv",
                "55.69% (+/- 12.45%)",
                "none (random init)",
            ),  # fmt: skip
            ("methods_auc", "seed004_methods_auc_resnet50.csv", "91.07% (+/- 12.3%)", "B_22"),
            ("methods_auc", "seed004_frozen_auc_resnet50.csv", "46.85% (+/- 5.74%)", "B_40"),
            (
                "transfer",
                "seed004_transfer_resnet50.csv",
                "77.48% (+/- 12.14%)",
                "60.00% (+/- 0.00%)",
            ),  # fmt: skip
            ("cost_resnet50", "seed004_cost_resnet50.csv", "23561229", "26637"),
        ],
    ),
    "chestxray densenet121": (
        chestxray_densenet_run,
        [
            (
                "methods_binary_accuracy",
                "seed004_methods_binary_accuracy_densenet121.csv",
                "95.07% (+/- 0.02%)",
                "B_88",
            ),  # fmt: skip
            ("methods_auc", "seed004_methods_auc_densenet121.csv", "95.49% (+/- 6.58%)", "B_14"),
            (
                "transfer",
                "seed004_transfer_densenet121.csv",
                "65.72% (+/- 18.12%)",
                "Without Transfer Learning",
            ),  # fmt: skip
            ("cost_densenet121", "seed004_cost_densenet121.csv", "10884", "B_39"),
        ],
    ),
    "nodule2d": (
        nodule2d_run,
        [("accuracy", "seed001_accuracy.csv", "0.95", "0.8806")],
    ),
}


def _pairs(html: str) -> list[str]:
    """The HTML of each side-by-side group (ours and the published tables beside it)."""
    groups = []
    for start in (m.end() for m in re.finditer('<div class="pair">', html)):
        depth, at = 1, start
        for tag in re.finditer(r"<div\b|</div>", html[start:]):  # the pair's own closing tag
            depth += 1 if tag.group().startswith("<div") else -1
            if depth == 0:
                at = start + tag.start()
                break
        groups.append(html[start:at])
    return groups


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_report_puts_each_published_table_beside_ours(tmp_path, recipe):
    make, expected = RECIPES[recipe]
    run = make(tmp_path)
    files = write_report([run], reference=REFERENCE)
    assert files.warnings == ()
    html, text = files.html.read_text(), files.markdown.read_text()
    pairs = _pairs(html)
    for ours, published, theirs_cell, our_cell in expected:
        seed = published[4:7]
        caption = f"{ours}: published (seed {seed}, {published})"
        group = [p for p in pairs if f"{ours} (this run)" in p and caption in p]
        assert group, f"{published} beside {ours}"
        assert theirs_cell in group[0] and our_cell in group[0]
        assert caption in text, "and in the Markdown twin"
    # the summary lists each of them as shown, with its source
    summary = summary_table(load_run(run), load_references(REFERENCE))
    for _, published, *_ in expected:
        row = summary[summary["published"].str.endswith(published)]
        assert row["shown"].tolist() == ["yes"] and row["source"].str.startswith("seed").all()
    assert "<h2>Published tables" in html


def test_a_quick_run_on_another_network_gets_the_published_tables_with_a_note(tmp_path):
    run = chestxray_quick_run(tmp_path)
    files = write_report([run], reference=REFERENCE)
    html = files.html.read_text()
    for name in (
        "seed004_methods_auc_resnet50.csv",
        "seed004_methods_auc_densenet121.csv",
        "seed004_frozen_auc_resnet50.csv",
        "seed004_cost_resnet50.csv",
        "seed004_cost_densenet121.csv",
        "seed004_transfer_densenet121.csv",
    ):
        assert name in html
    assert "published for densenet121, resnet50, not for this run&#x27;s resnet18" in html


def test_references_stand_beside_the_tables_of_their_network():
    refs = load_references(REFERENCE)

    def names(table, models):
        return sorted(r.path.name for r in refs.beside(table, models).references)

    assert names("cost_resnet50", {"resnet50"}) == ["seed004_cost_resnet50.csv"]
    # a cost-only run times several networks: each cost table gets its own network's
    assert names("cost_densenet121", {"resnet50"}) == ["seed004_cost_densenet121.csv"]
    assert names("methods_auc", {"densenet121"}) == ["seed004_methods_auc_densenet121.csv"]
    assert names("methods_auc", {"resnet50"}) == [
        "seed004_frozen_auc_resnet50.csv",
        "seed004_methods_auc_resnet50.csv",
    ]
    other = refs.beside("cost_resnet18", {"resnet18"})
    assert len(other.references) == 2 and "not for this run's resnet18" in other.note
    assert names("auc", set()) == ["seed000_auc.csv"] and names("speedup_b4", set()) == []
    assert run_models({"chestxray": {"model": "ResNet50", "train": {"lr": 1}}}) == {"resnet50"}


def test_transfer_table_from_the_folds_hand_checked():
    folds = pd.DataFrame(
        {
            "weights": ["I"] * 4 + ["C"] * 4 + ["none"] * 2,
            "method": ["A", "A", "C", "C", "A", "A", "C", "C", "D", "D"],
            "fold": [1, 2] * 5,
            "binary_accuracy": [0.5, 0.7, 0.8, 0.9, 0.9, 0.95, 0.6, 0.6, 0.4, 0.6],
            "auc": [0.5, 0.5, 0.9, 0.7, 0.6, 0.6, 0.5, 0.5, 0.5, 0.7],
        }
    )
    table, how = transfer_table(folds)
    assert table.index.name == "transfer learning"
    assert table.loc["Without Transfer Learning"].tolist() == [
        "50.00% (+/- 10.00%)",
        "60.00% (+/- 10.00%)",
    ]
    # accuracy: C/A has the best mean (0.925); AUC: I/C (0.8)
    assert table.loc["With Transfer Learning"].tolist() == [
        "92.50% (+/- 2.50%)",
        "80.00% (+/- 10.00%)",
    ]
    assert "C method A" in how and "I method C" in how
    assert transfer_table(folds.drop(columns="auc")) is None


# ----------------------------------------------------------------------------- bad input


def _copy_references(tmp_path: Path) -> Path:
    folder = tmp_path / "reference"
    shutil.copytree(REFERENCE, folder)
    return folder


def test_missing_and_malformed_references_give_notes_not_a_crash(tmp_path, capsys):
    folder = _copy_references(tmp_path)
    (folder / "seed004_cost_resnet50.csv").unlink()  # listed in index.csv, gone
    (folder / "seed004_methods_auc_resnet50.csv").write_text(
        'pretrained weights,A,B,C\nImageNet,"52.02%,1,2,3,4\n'
    )  # an unclosed quote: not a CSV table
    (folder / "seed000_pretrain_summary.csv").write_text("run,best epoch\n")  # no rows
    (folder / "seed004_transfer_resnet50.csv").write_text(
        "model,Binary Accuracy,AUC\nWithout,1%,2%\n"
    )  # readable, but rows of another kind than ours
    run = chestxray_run(tmp_path)
    lidc = lidc_pretrain_run(tmp_path)
    out = tmp_path / "r"
    assert main(["report", str(run), str(lidc), "--reference", str(folder), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    html = (out / "report-side-by-side.html").read_text()
    for name, what in (
        ("seed004_cost_resnet50.csv", "listed in index.csv but missing"),
        ("seed004_methods_auc_resnet50.csv", "not a readable CSV table"),
        ("seed000_pretrain_summary.csv", "a header but no rows"),
        ("seed004_transfer_resnet50.csv", "its rows are &#x27;model&#x27;, ours"),
    ):
        assert f"Published table {name} (seed 00" in html and what in html, name
        assert name in err
    assert err.count("warning: ") >= 4
    # the tables that are fine still stand beside ours
    assert "methods_binary_accuracy: published (seed 004" in html
    assert "methods_auc: published (seed 004, seed004_frozen_auc_resnet50.csv)" in html


def test_malformed_or_missing_index_falls_back_to_file_names(tmp_path):
    folder = _copy_references(tmp_path)
    (folder / INDEX_FILE).write_text("name,where\nx,y\n")
    refs = load_references(folder)
    assert any("index.csv: malformed (no column file, table" in p for p in refs.problems)
    assert [r.path.name for r in refs.beside("pretrain_summary").references] == [
        "seed000_pretrain_summary.csv"
    ]
    (folder / INDEX_FILE).unlink()
    refs = load_references(folder)
    assert any("index.csv: missing" in p for p in refs.problems)
    files = write_report([lidc_pretrain_run(tmp_path)], reference=folder)
    assert "index.csv: missing" in files.html.read_text() and files.warnings


def test_a_reference_folder_that_is_not_there_is_said(tmp_path):
    run = lidc_pretrain_run(tmp_path)
    files = write_report([run], reference=tmp_path / "nowhere")
    assert "reference folder not found" in files.html.read_text()
    assert files.warnings == (f"{tmp_path / 'nowhere'}: reference folder not found",)
    files = write_report([run], reference=tmp_path / "nowhere", use_reference=False)
    assert files.warnings == () and "published (seed" not in files.html.read_text()
