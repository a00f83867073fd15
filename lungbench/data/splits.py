"""Layer 3 (data): Train/validation/test splits: stratified, seeded, and storable in the HDF5 store.

    folds = stratified_kfold(labels, k=3, seed=0)          # (N,) fold index per sample
    train, val = stratified_split(np.arange(N), labels, 0.2, seed=0)   # seed 000: 20% val
    for split in cv_splits(labels, k=3, val_fraction=0.1):  # the thesis's LUNGx scheme
        split.train, split.val, split.test                  # disjoint index arrays
    store_folds(path, k=3, seed=0)                          # persist in /meta/fold
    check_fold_classes(labels, folds, ["benign", "malignant"])  # every fold can be scored

Labels are a class index per sample (N,) or multi-label one-hot (N, K); multi-label sets are
stratified on each sample's rarest positive label (or "no finding").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lungbench.core.errors import DataError, UsageError


@dataclass(frozen=True)
class Split:
    """One cross-validation fold: disjoint sample indices of the three sets."""

    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def stratification_key(labels: np.ndarray) -> np.ndarray:
    """A class per sample to stratify on: the label itself, or for multi-label (N, K) the
    rarest positive label (-1 for none), so rare findings are spread over the folds."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return labels
    frequency = labels.sum(axis=0)
    rank = np.where(labels > 0, frequency[None, :], np.inf)
    key = np.argmin(rank, axis=1)
    return np.where(labels.any(axis=1), key, -1)


def _check_fold_count(key: np.ndarray, k: int, what: str) -> None:
    if k < 2:
        raise UsageError(f"{what} must be >= 2, got {k}")
    classes, counts = np.unique(key, return_counts=True)
    if k > counts.min():
        smallest = classes[counts.argmin()]
        raise UsageError(
            f"{what} {k} is larger than the smallest class (class {smallest} has "
            f"{counts.min()} samples); choose at most {counts.min()}"
        )


def stratified_kfold(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold index 0..k-1 per sample; each class spread evenly over the folds (seeded).

    UsageError if `k` exceeds the number of samples of the smallest class.
    """
    from sklearn.model_selection import StratifiedKFold

    key = stratification_key(labels)
    if np.asarray(labels).ndim == 2:
        # Merge findings too rare to spread over k folds into the "no finding" stratum.
        classes, counts = np.unique(key, return_counts=True)
        key = np.where(np.isin(key, classes[counts < k]), -1, key)
    _check_fold_count(key, k, "fold count")
    folds = np.full(len(key), -1, dtype=np.int16)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(key)), key)):
        folds[test] = fold
    return folds


def stratified_split(
    indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split `indices` into (rest, held-out) with `fraction` held out, stratified by class.

    `labels` are the labels of all samples (indexed by `indices`). Returns sorted arrays.
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < fraction < 1.0:
        raise UsageError(f"validation fraction must be in (0, 1), got {fraction}")
    indices = np.asarray(indices)
    key = stratification_key(np.asarray(labels)[indices])
    n_classes = len(np.unique(key))
    n_held = max(int(round(fraction * len(indices))), n_classes)
    if len(indices) - n_held < n_classes or np.unique(key, return_counts=True)[1].min() < 2:
        raise UsageError(
            f"cannot hold out {fraction:.0%} of {len(indices)} samples with "
            f"every class on both sides; use more samples"
        )
    rest, held = train_test_split(indices, test_size=n_held, stratify=key, random_state=seed)
    return np.sort(rest), np.sort(held)


def cv_splits(
    labels: np.ndarray,
    k: int = 3,
    val_fraction: float = 0.1,
    seed: int = 0,
    folds: np.ndarray | None = None,
) -> list[Split]:
    """The thesis's LUNGx scheme: per fold one subset for testing, `val_fraction` of the other
    subsets for validation and the rest for training. `folds` (e.g. read from the store)
    overrides the stratified k-fold assignment."""
    labels = np.asarray(labels)
    if folds is None:
        folds = stratified_kfold(labels, k, seed)
    folds = np.asarray(folds)
    if folds.min() < 0 or set(np.unique(folds)) != set(range(k)):
        raise UsageError(
            f"fold assignment must use folds 0..{k - 1} for every sample, "
            f"found {sorted(set(np.unique(folds).tolist()))}"
        )
    splits = []
    for fold in range(k):
        test = np.flatnonzero(folds == fold)
        train, val = stratified_split(
            np.flatnonzero(folds != fold), labels, val_fraction, seed + fold
        )
        splits.append(Split(fold, train, val, test))
    return splits


def check_fold_classes(
    labels: np.ndarray,
    folds: np.ndarray,
    label_names: Sequence[str] | None = None,
    where: str | os.PathLike = "",
) -> None:
    """DataError naming the first fold (1-based, as the AUC table counts them) whose test
    or training part lacks a class of single-label `labels`: a one-class test set has no
    AUC (the run would end "complete" with NaN), and a model never shown a class learns
    nothing of it. Classes: 0..len(label_names)-1, else those in `labels` (at least two).
    Call it before the run folder is made, so that nothing is left behind."""
    labels, folds = np.asarray(labels), np.asarray(folds)
    names = list(label_names) if label_names else [str(c) for c in range(int(labels.max()) + 1)]
    prefix = f"{where}: " if str(where) else ""

    def shown(mask: np.ndarray) -> str:
        counts = np.bincount(labels[mask].astype(int), minlength=len(names))
        return ", ".join(f"{name} {int(c)}" for name, c in zip(names, counts, strict=False))

    present = set(np.unique(labels).astype(int).tolist())
    if len(names) < 2 or not set(range(len(names))) <= present:
        raise DataError(
            f"{prefix}the labels lack a class (samples per class: {shown(labels >= 0)}); "
            f"cross-validation needs every class in every fold"
        )
    ids = np.unique(folds)
    for number, fold in enumerate(ids, start=1):
        for part, mask in (("test", folds == fold), ("training", folds != fold)):
            lacking = [n for c, n in enumerate(names) if not np.any(labels[mask] == c)]
            if lacking:
                raise DataError(
                    f"{prefix}fold {number} of {len(ids)}: its {part} set has no sample of "
                    f"class {', '.join(lacking)} ({shown(mask)}); every fold needs every "
                    f"class: reassign the folds (/meta/fold) or add samples"
                )


def store_folds(path: str | os.PathLike, k: int, seed: int = 0) -> np.ndarray:
    """Assign stratified folds to a store's samples and write them to /meta/fold."""
    from lungbench.data.store import read_meta, write_folds

    folds = stratified_kfold(read_meta(path)["label"], k, seed)
    write_folds(path, folds, how=f"stratified {k}-fold, seed {seed}")
    return folds


def stored_folds(path: str | os.PathLike, k: int) -> np.ndarray | None:
    """The store's fold assignment if every sample has one of folds 0..k-1, else None."""
    from lungbench.data.store import read_meta

    folds = read_meta(path)["fold"].astype(int)
    if folds.min() >= 0 and set(np.unique(folds)) == set(range(k)):
        return folds
    return None
