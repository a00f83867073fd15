"""Layer 9 (train): Weighted binary cross-entropy of seed 004 (after Wang et al. 2017, ChestX-ray8):

    L = sum_i [ beta_P * sum_{k: y_ik = 1} -ln sigma(f_k(x_i))
              + beta_N * sum_{k: y_ik = 0} -ln (1 - sigma(f_k(x_i))) ]

    beta_P = (|P| + |N|) / |P|,   beta_N = (|P| + |N|) / |N|

with |P| and |N| the numbers of 1s and 0s in the training labels, counted per label (the
default: each finding gets its own weights, so a rare finding's positives weigh more) or over
all labels together (`per_label=False`, the seed's formula read literally).

    weights = class_weights(train_labels)          # (K,) beta_P, (K,) beta_N
    loss_fn = WeightedBCE(*weights)
    fit(model, train_ds, val_ds, config, options=FitOptions(loss_fn=loss_fn))
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lungbench.core.errors import DataError


def class_weights(labels: np.ndarray, per_label: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """beta_P and beta_N from 0/1 labels (N,) or (N, K) -> two float32 tensors of shape (K,)
    ((1,) for binary labels). A label with no positives (or no negatives) gets weight 1 for
    the missing side: there is nothing to balance."""
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.size == 0 or not np.isin(y, (0.0, 1.0)).all():
        raise DataError("weighted BCE needs 0/1 labels (binary or multi-label one-hot)")
    if per_label:
        pos, neg = y.sum(axis=0), (1.0 - y).sum(axis=0)
    else:
        pos = np.full(y.shape[1], y.sum())
        neg = np.full(y.shape[1], (1.0 - y).sum())
    total = pos + neg
    beta_p = np.where(pos > 0, total / np.maximum(pos, 1), 1.0)
    beta_n = np.where(neg > 0, total / np.maximum(neg, 1), 1.0)
    return (torch.tensor(beta_p, dtype=torch.float32), torch.tensor(beta_n, dtype=torch.float32))


def weighted_bce_with_logits(
    logits: torch.Tensor,
    target: torch.Tensor,
    beta_p: torch.Tensor,
    beta_n: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Seed 004's loss. logits and target (B, K) (or (B, 1) / (B,) for binary); beta_* (K,).

    reduction "sum" is the formula as written; "mean" divides it by B * K, so the loss (and a
    good learning rate) does not change with the batch size or the number of labels.
    """
    target = target.float().reshape(logits.shape[0], -1)
    logits = logits.float().reshape(target.shape)
    beta_p = beta_p.to(logits.device)
    beta_n = beta_n.to(logits.device)
    # -ln sigma(z) = softplus(-z) and -ln(1 - sigma(z)) = softplus(z), stable for large |z|.
    per_element = beta_p * target * F.softplus(-logits) + beta_n * (1.0 - target) * F.softplus(
        logits
    )
    return per_element.sum() if reduction == "sum" else per_element.mean()


class WeightedBCE(nn.Module):
    """`loss_fn(logits, target)` for the training engine, with fixed beta_P and beta_N."""

    def __init__(self, beta_p: torch.Tensor, beta_n: torch.Tensor, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.register_buffer("beta_p", torch.as_tensor(beta_p, dtype=torch.float32))
        self.register_buffer("beta_n", torch.as_tensor(beta_n, dtype=torch.float32))
        self.reduction = reduction

    @classmethod
    def from_labels(
        cls, labels: np.ndarray, per_label: bool = True, reduction: str = "mean"
    ) -> WeightedBCE:
        return cls(*class_weights(labels, per_label), reduction=reduction)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return weighted_bce_with_logits(logits, target, self.beta_p, self.beta_n, self.reduction)
