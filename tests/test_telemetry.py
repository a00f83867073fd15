"""Telemetry samplers: rate, clean stop, recorded facts, RAPL and NVML readings, summaries."""

from __future__ import annotations

import sys
import threading
import time
from types import SimpleNamespace

import pytest

from lungbench.cli import main
from lungbench.core.runs import read_records
from lungbench.measure.telemetry import (
    RaplSource,
    SweepMonitor,
    TelemetrySampler,
    file_name,
    summarize_samples,
    throttle_names,
)


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(1000))


def test_sampler_rate_and_clean_stop(tmp_path):
    sampler = TelemetrySampler(interval_s=0.05, gpus=[])
    with sampler:
        assert sampler.running
        busy(0.6)
    assert not sampler.running
    assert not any(t.name == "lungbench-telemetry" for t in threading.enumerate())
    # Structure, not rate: a loaded machine may delay the sampling thread (fewer samples),
    # never speed it up. Samples sit on the grid t0 + k * interval or later, never before, so
    # there are at most duration / interval + 2 of them (plus the ones at start and stop).
    n = len(sampler.samples)
    times = [s["t_s"] for s in sampler.samples]
    assert n >= 2, "a sample at start and one at stop"
    assert times == sorted(times)
    assert n <= times[-1] / 0.05 + 3, n
    for k, t in enumerate(times[1:-1], start=1):
        assert t >= k * 0.05 - 1e-3, (k, t)  # the k-th grid sample is not early
    row = sampler.samples[-1]
    assert row["rss_bytes"] > 0 and "cpu0_percent" in row and 0 <= row["cpu_percent"] <= 100
    count = len(sampler.samples)
    time.sleep(0.15)
    assert len(sampler.samples) == count, "no samples after stop()"

    path = sampler.write_csv(tmp_path / "t" / "series.csv")
    lines = path.read_text().splitlines()
    assert lines[0].startswith("t_s,unix_s,cpu_percent") and len(lines) == count + 1

    summary = sampler.summary(items=10)
    assert summary["samples"] == count and summary["duration_s"] >= 0.55
    assert summary["rss_peak_bytes"] > 0 and summary["cpu_util_mean_percent"] is not None
    assert summary["sources"]["nvml"] == "not requested (CPU run)"


def test_mark_samples_between_the_grid_points():
    """An epoch shorter than the interval still gets a sample: mark() takes one now; before
    start() and after stop() it takes none."""
    sampler = TelemetrySampler(interval_s=60, gpus=[])
    sampler.mark()
    assert sampler.samples == []
    with sampler:
        sampler.mark()
        sampler.mark()
    sampler.mark()
    assert len(sampler.samples) == 4  # start, two marks, stop; no grid point within 60 s
    times = [s["t_s"] for s in sampler.samples]
    assert times == sorted(times)


def test_missing_nvml_is_a_recorded_fact():
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine")
    except Exception:
        pass
    with TelemetrySampler(interval_s=1.0) as sampler:
        pass
    assert sampler.sources["nvml"].startswith("unavailable: ")
    summary = sampler.summary(items=4)
    assert summary["gpus"] == 0 and summary["gpu_util_mean_percent"] is None
    assert summary["energy_per_sample_j"] is None  # no energy source here: None, not an error


def _zone(root, name, label, energy, max_range=1_000_000):
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{energy}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    return zone


def test_rapl_energy_with_wraparound(tmp_path):
    pkg = _zone(tmp_path, "intel-rapl:0", "package-0", 990_000)
    dram = _zone(tmp_path, "intel-rapl:0:0", "dram", 100)
    source, fact = RaplSource.open(tmp_path)
    assert fact == "ok (2 zones)"
    (pkg / "energy_uj").write_text("10000\n")  # wrapped: 10_000 + 1_000_000 - 990_000 = 20_000
    (dram / "energy_uj").write_text("5100\n")
    row = source.read()
    assert row == {
        "rapl_package_0_0_j": pytest.approx(0.02),
        "rapl_dram_0_0_j": pytest.approx(0.005),
    }
    assert source.cpu_energy_columns() == ["rapl_package_0_0_j"]

    sampler = TelemetrySampler(interval_s=1.0, gpus=[], powercap=tmp_path)
    sampler.start()
    (pkg / "energy_uj").write_text("30000\n")  # +20_000 uJ after the wrap above
    sampler.stop()
    summary = sampler.summary(items=4)
    assert summary["cpu_energy_j"] == pytest.approx(0.02)
    assert summary["energy_per_sample_j"] == pytest.approx(0.005)


def test_rapl_missing_or_unreadable_is_a_fact(tmp_path):
    assert RaplSource.open(tmp_path / "none")[1].startswith("unavailable: ")
    assert RaplSource.open(tmp_path)[1].startswith("unavailable: no RAPL zone")


def fake_pynvml(energy_mj: list[int]):
    """A stand-in for nvidia-ml-py with one GPU whose energy counter reads `energy_mj`."""
    readings = iter(energy_mj)
    return SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        NVML_CLOCK_SM=1,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=80, memory=30),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=2**30, total=2**34),
        nvmlDeviceGetPowerUsage=lambda h: 250_000,  # mW
        nvmlDeviceGetTotalEnergyConsumption=lambda h: next(readings),
        nvmlDeviceGetTemperature=lambda h, kind: 61,
        nvmlDeviceGetClockInfo=lambda h, kind: 1755,
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: 0x4 | 0x20,
    )


def test_nvml_readings_and_summary(monkeypatch):
    # Counter readings: at open, at start, then one per sample; the last is +50 J.
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([1000, 1000, 51000, 51000]))
    sampler = TelemetrySampler(interval_s=10.0)
    sampler.start()
    sampler.stop()
    assert sampler.sources["nvml"] == "ok (1 GPUs)"
    row = sampler.samples[-1]
    assert row["gpu0_util_percent"] == 80 and row["gpu0_power_w"] == 250.0
    assert row["gpu0_mem_used_bytes"] == 2**30 and row["gpu0_sm_clock_mhz"] == 1755
    summary = sampler.summary(items=100)
    assert summary["gpus"] == 1 and summary["gpu_util_mean_percent"] == 80
    assert summary["gpu_energy_j"] == pytest.approx(50.0)
    assert summary["energy_per_sample_j"] == pytest.approx(0.5)
    assert summary["gpu_throttle_reasons"] == "sw_power_cap,sw_thermal_slowdown"
    assert summary["gpu_temp_max_c"] == 61


def test_power_is_integrated_without_an_energy_counter():
    samples = [
        {"t_s": 0.0, "gpu0_power_w": 100.0},
        {"t_s": 1.0, "gpu0_power_w": 200.0},
        {"t_s": 3.0, "gpu0_power_w": 200.0},
    ]
    summary = summarize_samples(samples, {}, items=5)
    # trapezoids: 1 s x 150 W + 2 s x 200 W = 550 J
    assert summary["gpu_energy_j"] == pytest.approx(550.0)
    assert summary["energy_per_sample_j"] == pytest.approx(110.0)
    assert throttle_names(0x1 | 0x40) == ["gpu_idle", "hw_thermal_slowdown"]


def test_sweep_monitor_adds_summary_and_writes_series(tmp_path):
    cfg = SimpleNamespace(
        workload=SimpleNamespace(device="cpu", batch_size=2),
        protocol=SimpleNamespace(warmup=1, repeats=3),
        key=lambda: "dualpath3d|default|f8|b2|cpu",
    )
    monitor = SweepMonitor(tmp_path / "telemetry", interval_s=0.05, run_dir=tmp_path)
    record = monitor(cfg, lambda: busy(0.2) or {"status": "ok", "epoch_samples": 6})
    assert record["telemetry_csv"] == "telemetry/dualpath3d_default_f8_b2_cpu.csv"
    assert (tmp_path / record["telemetry_csv"]).exists()
    assert record["telemetry_items"] == 2 * (1 + 1 + 3) + 6
    assert record["telemetry_samples"] >= 3 and record["telemetry_rss_peak_bytes"] > 0
    assert record["telemetry_source_psutil"] == "ok"
    assert file_name("a|b c/d") == "a_b_c_d"


def test_bench_records_carry_telemetry(tmp_path, capsys, tiny_store):
    argv = [
        "bench",
        "--preset",
        "dey2018",
        "--batch",
        "2",
        "--filters",
        "2",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--no-epoch",
        "--store",
        str(tiny_store),
        "--out",
        str(tmp_path),
        "--run-id",
        "tel",
        "--telemetry-interval",
        "0.05",
    ]
    assert main(argv) == 0
    (record,) = read_records(tmp_path / "tel")
    assert record["telemetry_samples"] >= 2
    assert (tmp_path / "tel" / record["telemetry_csv"]).stat().st_size > 0
    assert record["telemetry_source_nvml"] == "not requested (CPU run)"
    assert 0 < record["peak_fraction"] <= 1 and isinstance(record["peak_exceeded"], bool)


def test_bad_telemetry_interval(tmp_path, capsys, tiny_store):
    code = main(
        [
            "bench",
            "--store",
            str(tiny_store),
            "--out",
            str(tmp_path / "o"),
            "--telemetry-interval",
            "-1",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--telemetry-interval" in err[0]
    assert not (tmp_path / "o").exists()
