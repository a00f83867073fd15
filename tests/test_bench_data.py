"""`lungbench bench` generates only the samples its run reads: the count is in the cached
file's name, a smaller set is the first samples of the larger one, and the epoch's split of
the smaller set still has the samples --epoch-samples asks for."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

from lungbench.data.store import read_info, read_meta
from lungbench.experiments.speedup import BenchRequest, generated_samples, prepare_store
from lungbench.harness.sweep import TRAIN_FRACTION, train_split


def _request(tmp_path, **fields) -> BenchRequest:
    return BenchRequest(out=tmp_path, preset="dey2018", seed=4, **fields)


@pytest.mark.parametrize("epoch_samples", [*range(1, 40), 100, 301, 602, 603])
def test_the_epoch_finds_its_samples_in_the_smaller_set(epoch_samples):
    n = generated_samples(BenchRequest(epoch_samples=epoch_samples))
    assert n <= math.ceil(epoch_samples / TRAIN_FRACTION) + 2
    labels = np.arange(n) % 2  # the generator's labels (lungbench.data.synth)
    assert len(train_split(None, labels)) >= epoch_samples


def test_what_each_run_reads():
    assert generated_samples(BenchRequest()) == 754  # the thesis's split of the whole set
    assert generated_samples(BenchRequest(epoch_samples=32)) == 42
    assert generated_samples(BenchRequest(epoch_samples=700)) == 754  # capped by --synth-n
    assert generated_samples(BenchRequest(epoch=False)) == 2  # only the shapes are read
    assert generated_samples(BenchRequest(), reads=256) == 256  # --loader --loader-samples
    assert generated_samples(BenchRequest(synth_n=100), reads=256) == 100


def test_cache_is_keyed_by_the_count_and_a_prefix_of_the_full_set(tmp_path):
    small = prepare_store(_request(tmp_path, synth_n=6, epoch_samples=1))
    assert small.n == 4 and "-n4-" in small.path.name
    stamp = small.path.stat().st_mtime_ns
    # A run that needs more generates its own larger set; the smaller one stays as it was.
    full = prepare_store(_request(tmp_path, synth_n=6))
    assert full.n == 6 and "-n6-" in full.path.name
    # The same request again reuses its file.
    assert prepare_store(_request(tmp_path, synth_n=6, epoch_samples=1)).path == small.path
    assert small.path.stat().st_mtime_ns == stamp
    # Sample i does not depend on the set's size: the small set is the full set's start.
    with h5py.File(small.path) as a, h5py.File(full.path) as b:
        for name in ("context", "zoom"):
            np.testing.assert_array_equal(a[name][:], b[name][: small.n])
    assert list(read_meta(small.path)["id"]) == list(read_meta(full.path)["id"][: small.n])
    assert len(train_split(small, read_meta(small.path)["label"])) >= 1
    # A store given with --store is used as it is, whatever the epoch reads.
    given = prepare_store(_request(tmp_path / "other", store=full.path, epoch_samples=1))
    assert given.path == read_info(full.path).path and given.n == 6
    assert not (tmp_path / "other").exists()
