"""Layer 9 (train): what a prediction scores, and the default loss.

The default loss follows the target (BCE-with-logits for float targets, cross-entropy for
int64 ones), probabilities from logits per task, and accuracy and AUC for validation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def infer_task(target: torch.Tensor | np.ndarray) -> str:
    """binary (float (B,)), multilabel (float (B, K)) or multiclass (int64 (B,))."""
    is_float = (
        target.dtype.is_floating_point
        if isinstance(target, torch.Tensor)
        else np.issubdtype(target.dtype, np.floating)
    )
    if not is_float:
        return "multiclass"
    return "multilabel" if target.ndim == 2 else "binary"


def default_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits for float targets, cross-entropy for int64 targets (mean over batch)."""
    if target.dtype.is_floating_point:
        return F.binary_cross_entropy_with_logits(logits.reshape(target.shape).float(), target)
    return F.cross_entropy(logits.float(), target)


def to_probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Sigmoid for binary (-> (B,)) and multi-label, softmax for multiclass."""
    if task == "multiclass":
        return torch.softmax(logits.float(), dim=1)
    probs = torch.sigmoid(logits.float())
    return probs.reshape(-1) if task == "binary" else probs


def classification_metrics(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Accuracy (threshold 0.5 / argmax) and ROC AUC (NaN when only one class is present).

    Multi-label: binary accuracy over all (sample, label) pairs and the mean AUC over the
    labels that have both classes. Multiclass: one-vs-rest macro AUC.
    """
    from sklearn.metrics import roc_auc_score

    # One probability per sample means a binary task, whatever the targets' dtype.
    task = "binary" if probs.ndim == 1 else infer_task(targets)
    if task == "multiclass":
        accuracy = float(np.mean(probs.argmax(axis=1) == targets))
        if len(np.unique(targets)) != probs.shape[1]:
            auc = float("nan")
        elif probs.shape[1] == 2:  # sklearn wants the positive-class score for two classes
            auc = float(roc_auc_score(targets, probs[:, 1]))
        else:
            auc = float(roc_auc_score(targets, probs, multi_class="ovr"))
        return {"accuracy": accuracy, "auc": auc}
    accuracy = float(np.mean((probs >= 0.5) == (targets >= 0.5)))
    if task == "binary":
        auc = float(roc_auc_score(targets, probs)) if len(np.unique(targets)) == 2 else float("nan")
        return {"accuracy": accuracy, "auc": auc}
    aucs = [
        roc_auc_score(targets[:, k], probs[:, k])
        for k in range(targets.shape[1])
        if len(np.unique(targets[:, k])) == 2
    ]
    return {"accuracy": accuracy, "auc": float(np.mean(aucs)) if aucs else float("nan")}


def _batch_correct(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    task = infer_task(target)
    if task == "multiclass":
        return float((logits.argmax(1) == target).sum()), float(target.numel())
    pred = logits.reshape(target.shape) >= 0  # logit 0 is probability 0.5
    return float((pred == (target >= 0.5)).sum()), float(target.numel())
