"""Layer 9 (train): Precise batch-norm statistics: the running averages recomputed for the trained weights.

A batch norm normalises with the batch's statistics in training and with running averages
(momentum 0.1) in evaluation. After a short training at a high learning rate those
averages trail the weights: they mix the statistics of many earlier weights, and the
evaluated network is not the one that was trained (a quick nodule2d run scored 96% in
training mode and 63% in evaluation mode on the same crops). Recomputing them with the
final weights, as an exact average over the training samples ("precise BN", Wu & Johnson
2021, as detectron2/fvcore do), makes evaluation match training.

    recalibrate_batchnorm(model, train_ds, batch_size=32, device="cpu")

Frozen batch norms (transfer methods A and B, whose weights do not train) keep their
statistics: they belong to the pretrained weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from lungbench.data.loader import LoaderOptions, make_loader


def trainable_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch norms with running statistics whose affine weights train (all of them for
    norms without affine weights)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and (not m.affine or m.weight.requires_grad)
    ]


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, dataset: Dataset, batch_size: int = 32, device: str = "cpu"
) -> int:
    """Recompute the running mean and variance of the model's trainable batch norms as the
    average over `dataset` (batches of `(inputs_tuple, target)`), everything else in
    evaluation mode (dropout off, frozen norms untouched). Returns how many norms were
    recomputed; the model's mode and the norms' momentum are left as they were."""
    norms = trainable_norms(model)
    if not norms or len(dataset) == 0:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch counts the same
        m.train()
    target_device = torch.device(device)
    # A lone last sample would fail in a norm over 1x1 maps: keep batches of >= 2.
    opts = LoaderOptions(batch_size, shuffle=False, drop_last=len(dataset) > batch_size)
    loader = make_loader(dataset, opts, target_device)
    try:
        for inputs, _ in loader:
            model(*(x.to(target_device) for x in inputs))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)
