"""Layer 6 (measure): Telemetry: what the machine did while a benchmark or training run was measured.

A background thread samples, every `interval_s` seconds:
  - NVIDIA GPUs through nvidia-ml-py (`pynvml`): utilisation, memory used, power, the
    total-energy counter, temperature, SM clock and the clock throttle reasons;
  - the CPU through psutil: per-core utilisation and this process's resident set size;
  - RAPL energy counters where /sys/class/powercap is readable (often root-only).
A source that is missing (no NVML library, no GPU, unreadable RAPL) is recorded as a fact
in `sampler.sources`, never raised: a CPU-only laptop gets CPU telemetry and the reason why
there is no more.

    with TelemetrySampler(interval_s=0.2) as sampler:
        train_one_epoch()
    sampler.write_csv(run_dir / "telemetry" / "epoch.csv")   # the time series
    sampler.summary(items=603)    # mean utilisation, peak memory, joules per sample

`SweepMonitor` wraps each configuration of a `lungbench bench` sweep in a sampler and adds
the summary to its measurement record (fields prefixed `telemetry_`).
"""

from __future__ import annotations

import csv
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import psutil

from lungbench.core.errors import message_of
from lungbench.measure.workload import Protocol as TimingProtocol
from lungbench.measure.workload import Workload

POWERCAP = Path("/sys/class/powercap")


# NVML's clock throttle ("clocks event") reason bits, by name.
THROTTLE_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}


def throttle_names(mask: int) -> list[str]:
    """The names of the throttle reason bits set in NVML's `mask`."""
    return [name for bit, name in THROTTLE_REASONS.items() if int(mask) & bit]


class CpuSource:
    """Per-core CPU utilisation (whole machine) and this process's RSS, through psutil."""

    def __init__(self, pid: int | None = None) -> None:
        self.process = psutil.Process(pid)
        # psutil reports utilisation since the previous call: prime both counters now.
        psutil.cpu_percent(percpu=True)
        self.process.cpu_percent()

    def read(self) -> dict[str, float]:
        cores = psutil.cpu_percent(percpu=True)
        row: dict[str, float] = {
            "cpu_percent": sum(cores) / len(cores),
            "process_cpu_percent": self.process.cpu_percent(),
            "rss_bytes": self.process.memory_info().rss,
        }
        row.update({f"cpu{i}_percent": value for i, value in enumerate(cores)})
        return row


class RaplSource:
    """Cumulative energy (joules since start) of each RAPL zone under /sys/class/powercap.

    The counters wrap at `max_energy_range_uj`; a wrap between two samples is unwrapped.
    Package zones (and psys, if no package zone exists) make up `cpu_energy_j`.
    """

    def __init__(self, zones: list[tuple[str, Path, int]]) -> None:
        self.zones = zones
        self._last = [self._raw(path) for _, path, _ in zones]
        self._total = [0 for _ in zones]

    @classmethod
    def open(cls, root: Path = POWERCAP) -> tuple[RaplSource | None, str]:
        """The source, or None and the reason it is unavailable."""
        if not root.is_dir():
            return None, f"unavailable: {root} does not exist"
        zones, denied = [], None
        for zone in sorted(root.glob("*rapl:*")):
            energy = zone / "energy_uj"
            if not energy.exists():
                continue
            try:
                name = (zone / "name").read_text().strip()
                max_range = int((zone / "max_energy_range_uj").read_text())
                int(energy.read_text())
            except PermissionError:
                denied = energy
                continue
            except (OSError, ValueError):
                continue
            zones.append(
                (f"{_slug(name)}_{zone.name.split(':', 1)[1].replace(':', '_')}", energy, max_range)
            )
        if zones:
            return cls(zones), f"ok ({len(zones)} zones)"
        if denied is not None:
            return None, f"unavailable: {denied} is not readable (root only on this kernel)"
        return None, f"unavailable: no RAPL zone under {root}"

    @staticmethod
    def _raw(path: Path) -> int:
        return int(path.read_text())

    def read(self) -> dict[str, float]:
        row: dict[str, float] = {}
        for k, (name, path, max_range) in enumerate(self.zones):
            now = self._raw(path)
            delta = now - self._last[k]
            if delta < 0:  # the counter wrapped around
                delta += max_range
            self._total[k] += delta
            self._last[k] = now
            row[f"rapl_{name}_j"] = self._total[k] / 1e6
        return row

    def cpu_energy_columns(self) -> list[str]:
        """Columns whose sum is the CPU energy (packages; psys only when no package zone)."""
        names = [f"rapl_{name}_j" for name, _, _ in self.zones]
        packages = [n for n in names if n.startswith("rapl_package")]
        return packages or [n for n in names if n.startswith("rapl_psys")]


class NvmlSource:
    """Per-GPU readings through nvidia-ml-py; unsupported readings are left empty."""

    def __init__(self, nvml: Any, handles: list[tuple[int, Any]]) -> None:
        self.nvml = nvml
        self.handles = handles
        self._energy0 = {i: self._energy_mj(h) for i, h in handles}

    @classmethod
    def open(cls, indices: Sequence[int] | None = None) -> tuple[NvmlSource | None, str]:
        """The source for NVML devices `indices` (None = all), or None and the reason."""
        try:
            import pynvml
        except ImportError:
            return None, "unavailable: nvidia-ml-py is not installed"
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # no driver / library: a recorded fact, not an error
            return None, f"unavailable: {message_of(exc)}"
        try:
            count = pynvml.nvmlDeviceGetCount()
            wanted = range(count) if indices is None else [i for i in indices if i < count]
            handles = [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in wanted]
        except Exception as exc:
            pynvml.nvmlShutdown()
            return None, f"unavailable: {message_of(exc)}"
        if not handles:
            pynvml.nvmlShutdown()
            return None, f"unavailable: no GPU to watch ({count} visible to NVML)"
        return cls(pynvml, handles), f"ok ({len(handles)} GPUs)"

    def _energy_mj(self, handle: Any) -> int | None:
        return self._try(self.nvml.nvmlDeviceGetTotalEnergyConsumption, handle)

    def _try(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:  # NotSupported on this GPU model: leave the reading empty
            return None

    def read(self) -> dict[str, float | None]:
        nv = self.nvml
        row: dict[str, float | None] = {}
        for i, h in self.handles:
            util = self._try(nv.nvmlDeviceGetUtilizationRates, h)
            memory = self._try(nv.nvmlDeviceGetMemoryInfo, h)
            power_mw = self._try(nv.nvmlDeviceGetPowerUsage, h)
            energy_mj = self._energy_mj(h)
            energy0 = self._energy0.get(i)
            reasons = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
                nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None
            )
            row.update(
                {
                    f"gpu{i}_util_percent": None if util is None else util.gpu,
                    f"gpu{i}_mem_used_bytes": None if memory is None else memory.used,
                    f"gpu{i}_power_w": None if power_mw is None else power_mw / 1e3,
                    f"gpu{i}_energy_j": None
                    if energy_mj is None or energy0 is None
                    else (energy_mj - energy0) / 1e3,
                    f"gpu{i}_temp_c": self._try(
                        nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU
                    ),
                    f"gpu{i}_sm_clock_mhz": self._try(
                        nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM
                    ),
                    f"gpu{i}_throttle_mask": None if reasons is None else self._try(reasons, h),
                }
            )
        return row

    def close(self) -> None:
        self._try(self.nvml.nvmlShutdown)


class TelemetrySampler:
    """Samples every source in a background thread between `start()` and `stop()`.

    Args:
        interval_s: seconds between samples (one more is taken at start and at stop, so the
            series always covers the whole window).
        gpus: NVML device indices to watch; None = all, [] = no GPU sampling.
        pid: process whose RSS and CPU share are recorded (default: this one).
        powercap: root of the RAPL counters (a test points it at a fake tree).
    """

    def __init__(
        self,
        interval_s: float = 0.5,
        gpus: Sequence[int] | None = None,
        pid: int | None = None,
        powercap: Path = POWERCAP,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = float(interval_s)
        self.gpus = gpus
        self.pid = pid
        self.powercap = Path(powercap)
        self.samples: list[dict[str, Any]] = []
        self.sources: dict[str, str] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # mark() samples from the caller's thread too
        self._readers: list[Any] = []
        self._rapl: RaplSource | None = None
        self._nvml: NvmlSource | None = None
        self._t0 = 0.0

    # -- life cycle
    def start(self) -> TelemetrySampler:
        """Open the sources, take the first sample and start the thread."""
        if self._thread is not None:
            raise RuntimeError("sampler already started")
        self._open_sources()
        self.samples = []
        self._stop.clear()
        self._t0 = time.perf_counter()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="lungbench-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[dict[str, Any]]:
        """Stop and join the thread, take the last sample, close the sources."""
        if self._thread is None:
            return self.samples
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()
        if self._nvml is not None:
            self._nvml.close()
        return self.samples

    def mark(self) -> None:
        """Take one sample now, between the periodic ones: a fit marks each epoch's end so
        that even an epoch shorter than the interval has a sample of its own."""
        if self._thread is not None:
            self._sample()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> TelemetrySampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _open_sources(self) -> None:
        self._readers = [CpuSource(self.pid)]
        self.sources = {"psutil": "ok"}
        self._rapl, self.sources["rapl"] = RaplSource.open(self.powercap)
        if self.gpus is not None and len(self.gpus) == 0:
            self._nvml, self.sources["nvml"] = None, "not requested (CPU run)"
        else:
            self._nvml, self.sources["nvml"] = NvmlSource.open(self.gpus)
        self._readers += [s for s in (self._rapl, self._nvml) if s is not None]

    def _loop(self) -> None:
        # Sample on a fixed grid t0 + k * interval, so slow reads do not make the rate drift.
        k = 1
        while not self._stop.wait(max(0.0, self._t0 + k * self.interval_s - time.perf_counter())):
            self._sample()
            k = max(k + 1, math.ceil((time.perf_counter() - self._t0) / self.interval_s))

    def _sample(self) -> None:
        with self._lock:
            row: dict[str, Any] = {"t_s": time.perf_counter() - self._t0, "unix_s": time.time()}
            for reader in list(self._readers):
                try:
                    row.update(reader.read())
                except Exception as exc:  # a source that fails mid-run is dropped, says why
                    self._readers.remove(reader)
                    name = {RaplSource: "rapl", NvmlSource: "nvml"}.get(type(reader), "psutil")
                    self.sources[name] = f"failed during sampling: {message_of(exc)}"
            self.samples.append(row)

    # -- results
    def write_csv(self, path: str | Path) -> Path:
        """Write the time series (one row per sample, one column per reading)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = list(dict.fromkeys(c for row in self.samples for c in row))
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.samples)
        return path

    def summary(
        self, items: int | None = None, since: int = 0, until: int | None = None
    ) -> dict[str, Any]:
        """Mean utilisation, peak memory, energy; joules per item when `items` is given.

        Over samples[since:until] (all by default; the sample before `since` is included as
        the starting point of CPU shares and energy counters): one epoch of a fit, say."""
        return summarize_samples(
            self.samples[max(since - 1, 0) : until],
            self.sources,
            items,
            self._rapl.cpu_energy_columns() if self._rapl else [],
            self.interval_s,
        )


def summarize_samples(
    samples: Sequence[dict[str, Any]],
    sources: dict[str, str],
    items: int | None = None,
    cpu_energy_columns: Iterable[str] = (),
    interval_s: float | None = None,
) -> dict[str, Any]:
    """The per-measurement summary of a telemetry time series (pure; used by the sampler)."""
    later = samples[1:] or samples  # the first CPU reading covers no interval
    gpu_ids = sorted(
        {int(m.group(1)) for row in samples for c in row if (m := re.match(r"gpu(\d+)_", c))}
    )
    gpu_energy = _gpu_energy(samples, gpu_ids)
    cpu_energy = _sum_last(samples, cpu_energy_columns)
    energies = [e for e in (gpu_energy, cpu_energy) if e is not None]
    energy = sum(energies) if energies else None
    masks = [row.get(f"gpu{i}_throttle_mask") for row in samples for i in gpu_ids]
    reasons = sorted({n for m in masks if m for n in throttle_names(m)})
    return {
        "duration_s": samples[-1]["t_s"] - samples[0]["t_s"] if samples else 0.0,
        "samples": len(samples),
        "interval_s": interval_s,
        "cpu_util_mean_percent": _mean(r.get("cpu_percent") for r in later),
        "process_cpu_mean_percent": _mean(r.get("process_cpu_percent") for r in later),
        "rss_peak_bytes": _max(r.get("rss_bytes") for r in samples),
        "gpus": len(gpu_ids),
        "gpu_util_mean_percent": _mean(
            r.get(f"gpu{i}_util_percent") for r in samples for i in gpu_ids
        ),
        "gpu_mem_peak_bytes": _max(
            r.get(f"gpu{i}_mem_used_bytes") for r in samples for i in gpu_ids
        ),
        "gpu_power_mean_w": _mean(r.get(f"gpu{i}_power_w") for r in samples for i in gpu_ids),
        "gpu_temp_max_c": _max(r.get(f"gpu{i}_temp_c") for r in samples for i in gpu_ids),
        "gpu_sm_clock_mean_mhz": _mean(
            r.get(f"gpu{i}_sm_clock_mhz") for r in samples for i in gpu_ids
        ),
        "gpu_throttle_reasons": ",".join(reasons) or None,
        "gpu_energy_j": gpu_energy,
        "cpu_energy_j": cpu_energy,
        "energy_j": energy,
        "energy_per_sample_j": energy / items if energy is not None and items else None,
        "items": items,
        "sources": dict(sources),
    }


def _gpu_energy(samples: Sequence[dict[str, Any]], gpu_ids: Sequence[int]) -> float | None:
    """Joules over the window: the total-energy counter, else the power integrated."""
    total, found = 0.0, False
    for i in gpu_ids:
        counter = _sum_last(samples, [f"gpu{i}_energy_j"])
        if counter is None:
            counter = _integrate(samples, f"gpu{i}_power_w")
        if counter is not None:
            total, found = total + counter, True
    return total if found else None


def _integrate(samples: Sequence[dict[str, Any]], column: str) -> float | None:
    points = [(r["t_s"], r[column]) for r in samples if r.get(column) is not None]
    if len(points) < 2:
        return None
    return sum(
        (t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(points, points[1:], strict=False)
    )


def _sum_last(samples: Sequence[dict[str, Any]], columns: Iterable[str]) -> float | None:
    """Sum over `columns` of each one's last non-empty value (cumulative counters)."""
    values = []
    for column in columns:
        last = [r[column] for r in samples if r.get(column) is not None]
        if last:
            values.append(last[-1] - last[0])
    return sum(values) if values else None


def _mean(values: Iterable[Any]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _max(values: Iterable[Any]) -> float | None:
    kept = [v for v in values if v is not None]
    return max(kept) if kept else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "zone"


class MeasuredConfig(Protocol):
    """What SweepMonitor needs of a configuration (lungbench.harness.sweep.BenchConfig has it)."""

    workload: Workload
    protocol: TimingProtocol

    def key(self) -> str: ...


def nvml_indices(device: str) -> list[int]:
    """NVML indices of the GPU behind torch device `device` ([] for CPU).

    CUDA numbers devices after CUDA_VISIBLE_DEVICES, NVML does not: match them by PCI bus
    id, and fall back to the CUDA index when the bus id cannot be read.
    """
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return []
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    try:
        import pynvml

        props = torch.cuda.get_device_properties(index)
        bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
            return [int(pynvml.nvmlDeviceGetIndex(handle))]
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return [index]


def file_name(key: str) -> str:
    """A configuration key as a portable file name ('dualpath3d|default|f8' -> '..._f8')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")


class SweepMonitor:
    """Samples telemetry around each measured configuration of a sweep.

    Called as `monitor(cfg, run)` where `run()` measures `cfg` and returns its record: the
    time series goes to `folder/<config-key>.csv`, the summary into the record as
    `telemetry_*` fields. Energy per sample divides the energy of the whole configuration
    (model build, FLOP count, warm-up, timed steps and the epoch) by the samples it processed:
    batch x (1 + warm-up + repeats) + the epoch's samples.
    """

    def __init__(
        self,
        folder: Path,
        interval_s: float = 0.5,
        run_dir: Path | None = None,
        powercap: Path = POWERCAP,
    ) -> None:
        self.folder = Path(folder)
        self.interval_s = interval_s
        self.run_dir = Path(run_dir) if run_dir is not None else self.folder.parent
        self.powercap = powercap

    def __call__(
        self,
        cfg: MeasuredConfig,
        run: Callable[[], dict[str, Any]],
        device: str | None = None,
        per_sample: bool = True,
    ) -> dict[str, Any]:
        """`run()`'s record with the telemetry of `device` (default: cfg.device) while it ran;
        the series is named after the record's key. `per_sample=False` leaves out the energy
        per sample (a DDP record: this process sees its own GPU, not every rank's)."""
        sampler = TelemetrySampler(
            self.interval_s,
            gpus=nvml_indices(device or cfg.workload.device),
            powercap=self.powercap,
        )
        with sampler:
            record = run()
        key = str(record.get("key") or cfg.key())
        path = sampler.write_csv(self.folder / f"{file_name(key)}.csv")
        items = None
        if per_sample and record.get("status", "ok") == "ok":
            protocol = cfg.protocol
            items = cfg.workload.batch_size * (1 + protocol.warmup + protocol.repeats)
            items += int(record.get("epoch_samples") or 0)
        summary = sampler.summary(items)
        sources = summary.pop("sources")
        record.update({f"telemetry_{k}": v for k, v in summary.items()})
        record.update({f"telemetry_source_{k}": v for k, v in sources.items()})
        record["telemetry_csv"] = (
            str(path.relative_to(self.run_dir)) if path.is_relative_to(self.run_dir) else str(path)
        )
        return record
