"""Splits: stratified k-fold, validation hold-out, the LUNGx CV scheme, folds in the store."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from lungbench.core.errors import UsageError
from lungbench.data.splits import (
    cv_splits,
    store_folds,
    stored_folds,
    stratified_kfold,
    stratified_split,
)
from lungbench.data.store import read_meta

LUNGX_LABELS = np.array([0] * 37 + [1] * 36)  # the challenge: 37 benign, 36 malignant


def test_kfold_is_stratified_seeded_and_complete():
    folds = stratified_kfold(LUNGX_LABELS, 3, seed=0)
    assert set(folds.tolist()) == {0, 1, 2}
    for k in range(3):
        counts = np.bincount(LUNGX_LABELS[folds == k], minlength=2)
        assert abs(counts[0] - 37 / 3) < 1 and abs(counts[1] - 36 / 3) < 1
    assert np.array_equal(folds, stratified_kfold(LUNGX_LABELS, 3, seed=0))
    assert not np.array_equal(folds, stratified_kfold(LUNGX_LABELS, 3, seed=1))


def test_cv_splits_are_disjoint_and_cover_everything():
    splits = cv_splits(LUNGX_LABELS, k=3, val_fraction=0.1, seed=0)
    tests = np.concatenate([s.test for s in splits])
    assert sorted(tests.tolist()) == list(range(73))  # every nodule tested exactly once
    for s in splits:
        parts = [set(s.train.tolist()), set(s.val.tolist()), set(s.test.tolist())]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert len(s.train) + len(s.val) + len(s.test) == 73
        assert len(s.val) == round(0.1 * (73 - len(s.test)))  # 10% of the two other subsets
        assert set(LUNGX_LABELS[s.val]) == {0, 1}  # both classes validate


def test_validation_split_keeps_class_shares():
    labels = np.array([0] * 380 + [1] * 374)  # LIDC: 754 nodules, 50.3% / 49.7%
    train, val = stratified_split(np.arange(754), labels, 0.2, seed=0)
    assert len(val) == 151 and len(train) == 603  # the thesis's 603 training nodules
    assert not set(train) & set(val)
    assert abs(labels[val].mean() - labels.mean()) < 0.01


def test_fold_count_larger_than_a_class_is_a_usage_error():
    labels = np.array([0] * 10 + [1] * 4)
    with pytest.raises(UsageError, match="smallest class.*4 samples"):
        stratified_kfold(labels, 5)
    with pytest.raises(UsageError):
        stratified_kfold(labels, 1)


def test_multilabel_stratification_spreads_rare_findings():
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 4)) < [0.5, 0.3, 0.1, 0.0]).astype(np.uint8)
    folds = stratified_kfold(labels, 5, seed=0)
    assert set(folds.tolist()) == set(range(5))
    rare = labels[:, 2] == 1
    assert (
        np.bincount(folds[rare], minlength=5).max() - np.bincount(folds[rare], minlength=5).min()
        <= 1
    )


def test_folds_are_stored_in_the_file(tiny_store, tmp_path):
    path = tmp_path / "store.h5"
    shutil.copy(tiny_store, path)
    assert stored_folds(path, 3) is None  # generated stores start unassigned
    folds = store_folds(path, 3, seed=0)
    assert np.array_equal(read_meta(path)["fold"], folds)
    assert np.array_equal(stored_folds(path, 3), folds)
    assert stored_folds(path, 4) is None
