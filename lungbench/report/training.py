"""Layer 10 (report): Training tables in the thesis's layouts, and training plots (loss curves, ROC curves).

auc_table({"LIDC only": [..], "w/o pre-training": [..], "w/ pre-training": [..]})
    rows: regimes; columns: fold 1 .. fold k, average
confusion_table(y_true, y_prob, threshold=0.5)
    rows: Predictions Benign / Predictions Malignant / Total;
    columns: Benign / Malignant / Total (the true diagnosis)
transfer_table(folds)   (seed 004, from a chestxray run's folds.csv)
    rows: Without / With Transfer Learning; columns: Binary Accuracy, AUC ("mean% (+/- std%)")
loss_curves_plot({"w/o pre-training": history, ...}), roc_plot({...}),
metric_curves_plot({...}, "val_auc"), lr_schedule_plot(result.lr_steps, "one-cycle")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless clusters and CI: never need a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

CLASS_NAMES = ("Benign", "Malignant")
# seed 004's with/without transfer-learning table: its columns and the folds.csv metric of each
TRANSFER_COLUMNS = {"Binary Accuracy": "binary_accuracy", "AUC": "auc"}
WITHOUT_TRANSFER = "D"  # method D: random init, trained from scratch


def auc_table(aucs: Mapping[str, Sequence[float]]) -> pd.DataFrame:
    """AUC per regime (rows) and fold (columns 'fold 1'..'fold k'), plus their 'average'."""
    folds = max(len(v) for v in aucs.values())
    columns = [f"fold {i + 1}" for i in range(folds)]
    table = pd.DataFrame(
        [list(v) + [np.nan] * (folds - len(v)) for v in aucs.values()],
        index=list(aucs),
        columns=columns,
        dtype=float,
    )
    table["average"] = table[columns].mean(axis=1)
    table.index.name = "AUC"
    return table


def confusion_table(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    threshold: float = 0.5,
    class_names: Sequence[str] = CLASS_NAMES,
) -> pd.DataFrame:
    """Counts with totals in the thesis's layout: predictions in rows, true diagnosis in
    columns. A probability >= `threshold` predicts the second class."""
    names = list(class_names)
    y_true = np.asarray(y_true).astype(int).reshape(-1)
    y_pred = (np.asarray(y_prob).reshape(-1) >= threshold).astype(int)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.size} labels but {y_pred.size} probabilities")
    table = pd.crosstab(
        pd.Categorical(y_pred, categories=[0, 1]),
        pd.Categorical(y_true, categories=[0, 1]),
        margins=True,
        margins_name="Total",
        dropna=False,
    )
    table.index = [f"Predictions {n}" for n in names] + ["Total"]
    table.columns = [*names, "Total"]
    table.columns.name = "True diagnosis"
    return table


def mean_std_cell(values: Sequence[float]) -> str:
    """'87.14% (+/- 5.65%)' as seed 004 writes it (population std over the folds)."""
    v = np.asarray([x for x in values if x == x], dtype=float)
    if len(v) == 0:
        return "n/a"
    return f"{100 * v.mean():.2f}% (+/- {100 * v.std():.2f}%)"


def transfer_table(folds: pd.DataFrame) -> tuple[pd.DataFrame, str] | None:
    """Seed 004's "Without / With Transfer Learning" table from per-fold results (columns
    weights, method, fold, binary_accuracy, auc), and a note saying where each cell comes from.

    Without: method D (random init). With: for each metric, the (weights, method) of the run
    with the best mean over the folds (the seed's own "with" row takes its accuracy and its
    AUC from different cells too). None when `folds` lacks the columns or has no rows.
    """
    needed = {"weights", "method", *TRANSFER_COLUMNS.values()}
    if not needed <= set(folds.columns) or folds.empty:
        return None
    rows: dict[str, dict[str, str]] = {}
    notes = []
    scratch = folds[folds["method"] == WITHOUT_TRANSFER]
    if not scratch.empty:
        rows["Without Transfer Learning"] = {
            column: mean_std_cell(scratch[metric].tolist())
            for column, metric in TRANSFER_COLUMNS.items()
        }
        notes.append("Without: method D (random init)")
    transfer = folds[folds["method"] != WITHOUT_TRANSFER]
    if not transfer.empty:
        cells = transfer.groupby(["weights", "method"])
        best = {}
        for column, metric in TRANSFER_COLUMNS.items():
            means = cells[metric].mean()
            if means.isna().all():
                best[column] = "n/a"
                continue
            weights, method = means.idxmax()
            best[column] = mean_std_cell(cells.get_group((weights, method))[metric].tolist())
            notes.append(f"With, {column}: the best mean of this run, {weights} method {method}")
        rows["With Transfer Learning"] = best
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(TRANSFER_COLUMNS))
    table.index.name = "transfer learning"
    return table, "; ".join(notes)


def loss_curves_plot(histories: Mapping[str, pd.DataFrame], title: str):
    """Train (solid) and validation (dashed) loss per epoch, one colour per entry."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, history in histories.items():
        line = ax.plot(history["epoch"], history["train_loss"], label=f"{label} - train loss")[0]
        ax.plot(
            history["epoch"],
            history["val_loss"],
            linestyle="--",
            color=line.get_color(),
            label=f"{label} - val loss",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def metric_curves_plot(histories: Mapping[str, pd.DataFrame], column: str, title: str):
    """One history column (e.g. val_auc) per epoch, one line per entry."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, history in histories.items():
        ax.plot(history["epoch"], history[column], marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(column.replace("_", " "))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def lr_schedule_plot(lr_steps: pd.DataFrame, title: str):
    """The learning rate of every optimizer step (FitResult.lr_steps: step, epoch, lr), with
    the epoch boundaries dotted and the peak marked: one-cycle's warm-up and annealing, a
    cosine's or a step schedule's per-epoch moves."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(lr_steps["step"], lr_steps["lr"], linewidth=1.5)
    for end in lr_steps.groupby("epoch")["step"].max().iloc[:-1]:
        ax.axvline(end + 0.5, color="grey", linestyle=":", linewidth=0.8)
    if len(lr_steps):
        peak = lr_steps.loc[lr_steps["lr"].idxmax()]
        ax.plot([peak["step"]], [peak["lr"]], "o", color="C3")
        ax.annotate(
            f"peak {peak['lr']:.2e} at step {int(peak['step'])}",
            (peak["step"], peak["lr"]),
            textcoords="offset points",
            xytext=(6, -12),
            fontsize=8,
        )
    ax.set_xlabel("optimizer step (epochs dotted)")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig


def roc_plot(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str):
    """ROC curve per entry from (y_true, y_prob), with its AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    for label, (y_true, y_prob) in curves.items():
        if len(np.unique(y_true)) < 2:
            continue  # no ROC with one class
        fpr, tpr, _ = roc_curve(y_true, y_prob)
        ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(y_true, y_prob):.2f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    return fig
