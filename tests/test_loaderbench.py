"""The data path: cached store, loader options, device augmentation, the loader benchmark."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lungbench.data.loader import (
    DeviceAugment,
    LoaderOptions,
    SharedStoreDataset,
    make_loader,
    rotate_last_two,
)
from lungbench.data.store import StoreDataset
from lungbench.harness.loader import LoaderVariant, loader_table, run_loader_bench
from lungbench.harness.sweep import BenchConfig, measure_epoch, train_split
from lungbench.measure.data_wait import DATA_BOUND_FRACTION, data_bound
from lungbench.measure.workload import Protocol, Workload

CPU = torch.device("cpu")


def test_cached_items_equal_the_lazy_ones_and_live_in_shared_memory(tiny_store):
    lazy, cached = StoreDataset(tiny_store), SharedStoreDataset(tiny_store)
    assert len(lazy) == len(cached) == 24
    assert all(a.is_shared() for a in cached.arrays)
    for k in (0, 7, 23):
        (xl, yl), (xc, yc) = lazy[k], cached[k]
        assert all(torch.equal(a, b) for a, b in zip(xl, xc, strict=True)) and float(yl) == float(
            yc
        )
    batch = cached.__getitems__([3, 5])
    assert torch.equal(batch[1][0][0], lazy[5][0][0])


def test_loader_with_workers_and_cache_delivers_every_sample(tiny_store):
    opts = LoaderOptions(batch_size=4, num_workers=1, cache=True, shuffle=False)
    loader = make_loader(SharedStoreDataset(tiny_store), opts, CPU, indices=range(10))
    assert loader.persistent_workers and not loader.pin_memory
    labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == StoreDataset(tiny_store).labels[:10].astype(float).tolist()


def test_rotation_by_90_degrees_is_rot90_and_shapes_are_kept():
    x = torch.arange(2 * 1 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 1, 3, 4, 4)
    out = rotate_last_two(x, torch.full((2,), math.pi / 2))
    assert torch.allclose(out, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-4)
    aug = DeviceAugment(max_degrees=180, flip=True, seed=1)
    a, b = aug([x, x + 1])
    assert a.shape == x.shape and torch.allclose(b, a + 1, atol=1e-4)  # one draw per sample


def test_data_bound_flag():
    assert data_bound({"epoch_data_wait_s": 0.5, "epoch_s": 1.0}) is True
    assert data_bound({"epoch_data_wait_s": DATA_BOUND_FRACTION / 2, "epoch_s": 1.0}) is False
    assert data_bound({}) is None


def test_epoch_record_flags_data_bound_and_uses_the_cache(tiny_store):
    dataset = StoreDataset(tiny_store)
    indices = train_split(dataset.info, dataset.labels)
    cfg = BenchConfig(
        Workload(preset="dey2018", filters=2), protocol=Protocol(epoch_samples=6), cache=True
    )
    record = measure_epoch(cfg, dataset, indices, CPU)
    assert record["epoch_samples"] == 6 and isinstance(record["data_bound"], bool)
    assert record["data_bound"] == data_bound(record)


def test_loader_benchmark_produces_its_figures(tiny_store):
    variants = [
        LoaderVariant("hdf5", LoaderOptions(batch_size=4)),
        LoaderVariant("cache, 1 worker", LoaderOptions(batch_size=4, cache=True, num_workers=1)),
        LoaderVariant("hdf5 + aug", LoaderOptions(batch_size=4, augment="rotation_only")),
        LoaderVariant(
            "cache + aug on device",
            LoaderOptions(batch_size=4, cache=True, augment="flips", augment_on="device"),
        ),
    ]
    records, table = run_loader_bench(tiny_store, CPU, variants, samples=12, step_rate=10.0)
    assert [r["variant"] for r in records] == [v.name for v in variants]
    for r in records:
        assert r["samples"] == 12 and r["samples_per_s"] > 0 and r["startup_s"] >= 0
        assert r["x_step_rate"] == pytest.approx(r["samples_per_s"] / 10.0)
    assert list(table.columns) == ["samples/s", "start-up s", "x step rate"]
    assert np.isfinite(loader_table(records, None)["samples/s"]).all()


def test_device_wait_clock_counts_only_the_waits_on_cpu():
    from lungbench.measure.data_wait import DeviceWaitClock

    now = [100.0]
    clock = DeviceWaitClock(torch.device("cpu"), clock=lambda: now[0])  # planted readings
    clock.start()
    for wait, step in ((0.05, 0.03), (0.02, 0.03)):
        now[0] += wait  # the loader
        clock.batch_ready()
        now[0] += step  # the (synchronous) CPU step: not waiting
        clock.step_done()
    assert clock.seconds() == pytest.approx(0.07)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_wait_clock_ignores_host_waits_hidden_by_running_kernels():
    """A slow host fetch while the GPU still runs the previous step is no device wait."""
    import time

    from lungbench.measure.data_wait import DeviceWaitClock

    device = torch.device("cuda")
    a = torch.randn(8192, 8192, device=device)
    torch.cuda.synchronize()
    clock = DeviceWaitClock(device)
    clock.start()
    clock.batch_ready()
    for _ in range(20):  # about 0.1 s or more of queued GPU work
        a = a @ a / 8192
    clock.step_done()
    time.sleep(0.01)  # the host waits for data while the kernels run
    clock.batch_ready()
    hidden = clock.seconds()
    torch.cuda.synchronize()
    clock.step_done()
    time.sleep(0.05)  # now the GPU is idle while the host waits
    clock.batch_ready()
    assert hidden < 0.005 and clock.seconds() - hidden >= 0.045
