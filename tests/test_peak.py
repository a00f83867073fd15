"""The device peak: a large matrix product and a large copy, stored by `lungbench env --peak`."""

from __future__ import annotations

import json

import pytest
import torch

import lungbench.measure.peak as peak
from lungbench.cli import main
from lungbench.measure.peak import attach_peak, copy_bandwidth, matmul_peak_flops, peak_record


def test_peak_record_is_positive():
    cpu = torch.device("cpu")
    record = peak_record(cpu, "fp32", size=256, nbytes=2**22)
    assert record["matmul_flops"] > 0 and record["copy_bytes_per_s"] > 0
    assert record["device"] == "cpu" and record["dtype"] == "fp32" and record["matmul_size"] == 256
    assert matmul_peak_flops(cpu, "bf16", size=64, repeats=1) > 0
    assert copy_bandwidth(cpu, 2**20, repeats=1) > 0


def test_env_peak_is_stored_in_the_record(tmp_path, capsys, monkeypatch):

    # The CLI path with smaller sizes (the defaults take seconds on 2 cores).
    original = peak.peak_record
    monkeypatch.setattr(
        peak, "peak_record", lambda device, dtype: original(device, dtype, size=256, nbytes=2**22)
    )
    saved = tmp_path / "env.json"
    assert main(["env", "--peak", "--device", "cpu", "--dtype", "fp32", "--save", str(saved)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["peak"]["matmul_flops"] > 0 and printed["peak"]["copy_bytes_per_s"] > 0
    assert json.loads(saved.read_text())["peak"]["dtype"] == "fp32"


def test_env_peak_bad_dtype(capsys):
    assert main(["env", "--peak", "--dtype", "fp64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown --dtype 'fp64'" in err[0]


def test_peak_record_defaults_are_the_measurements_defaults(monkeypatch):

    # The record names the sizes the measurements use; stubs keep this instant.
    monkeypatch.setattr(peak, "matmul_peak_flops", lambda device, dtype, size: float(size))
    monkeypatch.setattr(peak, "copy_bandwidth", lambda device, nbytes: float(nbytes))
    record = peak.peak_record(torch.device("cpu"))
    assert record["matmul_size"] == peak.MATMUL_SIZE["cpu"] == record["matmul_flops"]
    assert record["copy_bytes"] == peak.COPY_BYTES["cpu"] == record["copy_bytes_per_s"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--device", "cpu"], "--device cpu: only used with --peak"),
        (["--dtype", "bf16"], "--dtype bf16: only used with --peak"),
        (["--peak", "--dtype", "fp16"], "--dtype fp16: not measured on CPU"),
    ],
)
def test_env_bad_input_is_one_line(capsys, monkeypatch, argv, expected):

    monkeypatch.setattr(peak, "peak_record", _never_measure)
    assert main(["env", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    if "fp16" in argv:
        assert "choose from: fp32, bf16" in err[0]


def test_env_save_is_checked_before_the_peak(tmp_path, capsys, monkeypatch):

    monkeypatch.setattr(peak, "peak_record", _never_measure)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["env", "--peak", "--save", str(blocker / "env.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--save" in err[0] and "cannot write" in err[0], err
    assert main(["env", "--peak", "--save", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def _never_measure(*args, **kwargs):
    raise AssertionError("bad input must be rejected before the measurement")


def test_attach_peak_uses_the_dtype_the_math_ran_in():
    peaks = {"fp32": 1e11, "bf16": 4e11}
    bf16 = {"dtype_used": "bf16", "achieved_flops": 1e11}
    fp32 = {"dtype_used": "fp32", "achieved_flops": 1e11}
    attach_peak(bf16, peaks)
    attach_peak(fp32, peaks)
    assert bf16["peak_fraction"] == 0.25 and bf16["peak_dtype"] == "bf16"
    assert fp32["peak_fraction"] == 1.0 and fp32["peak_flops"] == 1e11
    unmeasured = {"dtype_used": "fp16", "achieved_flops": 1e11}
    attach_peak(unmeasured, peaks)  # no fp16 peak (CPU): no fraction rather than a wrong one
    assert "peak_fraction" not in unmeasured


def test_saved_peaks_reads_runs_of_the_fp32_only_format(tmp_path):
    from lungbench.harness.sweep_state import saved_peaks

    (tmp_path / "environment.json").write_text(json.dumps({"peak_flops_fp32": {"cpu": 2e11}}))
    assert saved_peaks(tmp_path) == {"cpu": {"fp32": 2e11}}
    (tmp_path / "environment.json").write_text(
        json.dumps({"peak_flops": {"cpu": {"fp32": 2e11, "bf16": 5e11}}})
    )
    assert saved_peaks(tmp_path) == {"cpu": {"fp32": 2e11, "bf16": 5e11}}


def test_peak_fraction_never_exceeds_one_and_the_roofline_is_stated():
    peaks = {"fp32": 100e9, "copy_bytes_per_s": 10e9}
    fast = {
        "dtype_used": "fp32",
        "achieved_flops": 150e9,  # above the measured peak: a peak measured on a busy machine
        "flops_per_step": 3e9,
        "bytes_per_step": 0.1e9,
        "step_s_median": 0.02,
    }
    attach_peak(fast, peaks)
    assert fast["peak_fraction"] == 1.0 and fast["peak_exceeded"] is True
    # compute 3e9 / 100e9 = 30 ms, memory 0.1e9 / 10e9 = 10 ms: compute bound, capped at 1
    assert fast["roofline_bound"] == "compute" and fast["roofline_s"] == pytest.approx(0.03)
    slow = {**fast, "achieved_flops": 30e9, "step_s_median": 0.1, "bytes_per_step": 2e9}
    attach_peak(slow, peaks)
    assert slow["peak_exceeded"] is False and slow["peak_fraction"] == pytest.approx(0.3)
    # memory 2e9 / 10e9 = 200 ms > compute 30 ms: memory bound; the step is at its bound
    assert slow["roofline_bound"] == "memory" and slow["roofline_fraction"] == 1.0


def test_bytes_moved_grow_with_the_batch_and_cover_the_weights():
    from lungbench.measure.timing import training_step_bytes

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

    def loss(out, y):
        return ((out.squeeze(1) - y) ** 2).mean()

    small = training_step_bytes(model, loss, [torch.randn(4, 64)], torch.randn(4))
    large = training_step_bytes(model, loss, [torch.randn(64, 64)], torch.randn(64))
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert weights < small < large


def test_device_peaks_report_their_spread_and_bandwidth(monkeypatch):
    from lungbench.measure import peak as peak_module

    monkeypatch.setattr(peak_module, "matmul_peak_stats", lambda d, dt, *a: (100.0, 90.0))
    monkeypatch.setattr(peak_module, "copy_bandwidth", lambda d, *a: 5.0)
    found = peak_module.device_peaks(torch.device("cpu"), ("fp32",))
    assert found == {"fp32": 100.0, "fp32_spread": pytest.approx(0.1), "copy_bytes_per_s": 5.0}


def test_peaks_are_kept_per_host_and_a_busy_moment_cannot_lower_them(monkeypatch, tmp_path):
    from lungbench.measure import peak_cache

    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path))  # an empty cache of its own
    measured = iter([{"fp32": 100.0, "fp32_spread": 0.1}, {"fp32": 60.0, "fp32_spread": 0.4}])
    monkeypatch.setattr(peak_cache, "device_peaks", lambda device, dtypes: next(measured))
    busy = iter([False, True])
    monkeypatch.setattr(peak_cache.ContentionWatch, "stop", lambda self: {"busy": next(busy)})
    cpu = torch.device("cpu")
    first, source = peak_cache.robust_peaks(cpu, ("fp32",))
    assert first["fp32"] == 100.0 and source.startswith("measured quiet")
    second, source = peak_cache.robust_peaks(cpu, ("fp32",))  # busy now: 60 would be low
    assert second["fp32"] == 100.0 and source == "cache (machine busy now)"


def test_peaks_measured_busy_are_cached_marked_busy_and_a_quiet_run_replaces_them(
    monkeypatch, tmp_path
):
    from lungbench.core.cache import read_cache, where_key
    from lungbench.measure import peak_cache

    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path))
    measured = iter([{"fp32": 40.0}, {"fp32": 50.0}, {"fp32": 90.0}])
    monkeypatch.setattr(peak_cache, "device_peaks", lambda device, dtypes: next(measured))
    busy = iter([True, True, False])
    monkeypatch.setattr(
        peak_cache.ContentionWatch, "stop", lambda self: {"busy": next(busy), "busy_reason": "x"}
    )
    cpu = torch.device("cpu")
    first, source = peak_cache.robust_peaks(cpu, ("fp32",))
    assert first["fp32"] == 40.0 and "cached, marked busy" in source
    cached = read_cache(peak_cache.CACHE_FILE)[where_key(cpu)]
    assert cached == {"fp32": 40.0, "busy_reason": "x"}
    second, source = peak_cache.robust_peaks(cpu, ("fp32",))  # busy again: the best of both
    assert second["fp32"] == 50.0 and "marked busy" in source
    third, source = peak_cache.robust_peaks(cpu, ("fp32",))  # quiet: replaces the busy ones
    assert third["fp32"] == 90.0 and source.startswith("measured quiet")
    assert read_cache(peak_cache.CACHE_FILE)[where_key(cpu)]["busy_reason"] is None
