"""Augmentation: one draw applied to every array, seeded, shapes kept, presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lungbench.core.errors import UsageError
from lungbench.data.store import StoreDataset
from lungbench.data.transforms import (
    PRESETS,
    Augment,
    AugmentParams,
    Identity,
    apply,
    make_transform,
    sample_key,
    shift_edge,
)


def _pair(rng):
    """A context/zoom-like pair with different grids, the same content pattern scaled."""
    return (
        rng.random((1, 5, 12, 12)).astype(np.float32),
        rng.random((1, 7, 9, 9)).astype(np.float32),
    )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_keep_shapes_and_dtype(name):
    arrays = _pair(np.random.default_rng(0))
    out = make_transform(name, seed=1)(arrays)
    assert isinstance(out, tuple) and len(out) == 2
    for a, b in zip(arrays, out, strict=True):
        assert b.shape == a.shape and b.dtype == np.float32


def test_unknown_preset_lists_choices():
    with pytest.raises(UsageError, match="rotation_only"):
        make_transform("rotate_only")


def test_same_seed_same_draws_and_different_seed_differs():
    arrays = _pair(np.random.default_rng(0))
    a = Augment(max_degrees=180, flip=True, max_shift=2, seed=5)(arrays)
    b = Augment(max_degrees=180, flip=True, max_shift=2, seed=5)(arrays)
    c = Augment(max_degrees=180, flip=True, max_shift=2, seed=6)(arrays)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_flip_is_applied_to_all_arrays_together():
    # Two arrays that are identical: after any draw they must still be identical.
    x = np.random.default_rng(1).random((1, 6, 10, 10)).astype(np.float32)
    aug = Augment(max_degrees=180, flip=True, max_shift=2, seed=0)
    for _ in range(10):
        a, b = aug((x, x.copy()))
        np.testing.assert_array_equal(a, b)


def test_rotation_by_90_matches_rot90_in_last_two_axes():
    x = np.random.default_rng(2).random((1, 3, 9, 9)).astype(np.float32)
    out = apply(x, AugmentParams(angle=90.0))
    expected = np.rot90(x, k=1, axes=(-2, -1))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_rotation_only_preset_only_rotates():
    aug = make_transform("rotation_only", seed=0)
    params = aug.draw(np.random.default_rng(0), 3)
    assert params.angle != 0 and params.flips == () and params.shift == ()


def test_rotation_preserves_centre_of_a_centred_blob():
    # A centred bright blob stays centred (rotation is about the array centre).
    z, y, x = np.mgrid[:5, :15, :15]
    blob = (((y - 7) ** 2 + (x - 7) ** 2) < 9).astype(np.float32)[None]
    out = apply(blob, AugmentParams(angle=37.0))
    ys, xs = np.nonzero(out[0, 2] > 0.5)
    assert abs(ys.mean() - 7) < 0.3 and abs(xs.mean() - 7) < 0.3


def test_shift_moves_content_and_pads_with_edge():
    x = np.arange(6, dtype=np.float32)[None]
    np.testing.assert_array_equal(shift_edge(x, [2]), [[0, 0, 0, 1, 2, 3]])
    np.testing.assert_array_equal(shift_edge(x, [-1]), [[1, 2, 3, 4, 5, 5]])


def test_2d_items_supported():
    img = np.random.default_rng(3).random((3, 16, 16)).astype(np.float32)
    (out,) = Augment(max_degrees=30, flip=True, max_shift=1, seed=0)((img,))
    assert out.shape == img.shape


def test_identity_returns_tuple():
    x = np.zeros((1, 2, 2, 2), np.float32)
    assert Identity()([x])[0] is x


def test_negative_parameters_rejected():
    with pytest.raises(UsageError):
        Augment(max_degrees=-1)


def test_workers_draw_different_augmentations(tiny_store):
    # Two workers must not repeat each other's draws (each re-seeds from its torch seed).
    ds = StoreDataset(tiny_store, indices=[0, 0, 0, 0], transform=make_transform("standard"))
    torch.manual_seed(0)
    loader = DataLoader(ds, batch_size=1, num_workers=2)
    batches = [inputs[0].numpy() for inputs, _ in loader]
    assert not np.array_equal(batches[0], batches[1])


def test_sample_key_makes_a_draw_a_function_of_epoch_and_index():
    # What exact resume needs: the draw for (epoch, index) ignores what was drawn before.
    arrays = _pair(np.random.default_rng(0))
    fresh, used = make_transform("standard", seed=4), make_transform("standard", seed=4)
    for _ in range(3):
        used(arrays)  # advances only the unkeyed per-process generator
    with sample_key(epoch=2, index=7):
        a, b = fresh(arrays), used(arrays)
    np.testing.assert_array_equal(a[0], b[0])
    with sample_key(epoch=3, index=7):
        other_epoch = fresh(arrays)
    with sample_key(epoch=2, index=8):
        other_index = fresh(arrays)
    assert not np.array_equal(a[0], other_epoch[0])
    assert not np.array_equal(a[0], other_index[0])
