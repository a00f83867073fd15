"""Layer 8 (predict): device profiles: what a device can do, each number with its source.

Profiles are small TOML files shipped in `lungbench/predict/devices/` (V100 SXM2,
A100 SXM 40/80 GB, H100 SXM, H200, L40S: vendor data sheets) plus `cpu`, this machine's CPU,
whose numbers are measured when it is used (lungbench.measure.peak, the same measurement as
`lungbench env --peak`). A user's own profile is a TOML file of the same layout
(`lungbench predict --device-file my-gpu.toml`):

    name = "my-gpu"
    kind = "cuda"
    [peak_flops]
    fp32 = { value = 19.5e12, source = "vendor data sheet, FP32" }
    [memory]
    bandwidth = { value = 1.555e12, source = "..." }
    size = { value = 40e9, source = "..." }
    [interconnect]
    bandwidth = { value = 600e9, source = "..." }   # aggregate, both directions
    latency = { value = 10e-6, source = "..." }
    [launch]
    kernel = { value = 5e-6, source = "..." }
    [efficiency]                                    # fraction of peak a kernel reaches
    compute = { value = 0.5, source = "..." }
    memory = { value = 0.8, source = "..." }
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungbench.core.cache import measured_number, measured_numbers, register_schema
from lungbench.core.errors import DataError, UsageError
from lungbench.measure.allreduce import AlphaBeta

log = logging.getLogger(__name__)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the backport
    import tomli as tomllib

CONV_OPERATORS = ("aten.convolution", "aten.convolution_backward")

REQUIRED = (
    ("memory", "bandwidth"),
    ("memory", "size"),
    ("interconnect", "bandwidth"),
    ("interconnect", "latency"),
    ("launch", "kernel"),
    ("efficiency", "compute"),
    ("efficiency", "memory"),
)


@dataclass(frozen=True)
class DeviceProfile:
    """Peaks (FLOP/s per dtype), memory bandwidth and size, interconnect, launch cost and
    the fraction of peak kernels reach, with the source of each (`sources[name]`)."""

    name: str
    title: str
    kind: str  # "cpu" or "cuda"
    peak_flops: dict[str, float]
    memory_bandwidth: float  # bytes/s
    memory_size: float  # bytes
    link_bandwidth: float  # bytes/s, aggregate both directions (vendor figure)
    link_latency_s: float
    kernel_launch_s: float
    compute_efficiency: float
    memory_efficiency: float
    link_name: str = ""
    measured: bool = False  # numbers measured on this machine when used
    sources: dict[str, str] = field(default_factory=dict)
    threads: int | None = None  # CPU profiles: the thread count the peaks were measured at
    # Measured CPUs: (bytes a copy moves, bytes/s) from cache-sized to DRAM-sized copies.
    bandwidth_curve: tuple[tuple[float, float], ...] = ()
    # Measured CPUs: FLOP/s per dtype of a 3D convolution's forward and backward
    # (lungbench.measure.peak.conv_rate): the compute bound of convolution calls.
    conv_flops: dict[str, float] = field(default_factory=dict)

    def peak(self, dtype: str) -> float:
        """FLOP/s of `dtype` math; a dtype the device lacks runs at its FP32 peak."""
        return self.peak_flops.get(dtype) or self.peak_flops["fp32"]

    def compute_rate(self, operator: str, dtype: str) -> float:
        """FLOP/s that bounds `operator`'s math: the measured convolution rate for a
        convolution where there is one, else the peak of its dtype."""
        if operator in CONV_OPERATORS and self.conv_flops.get(dtype):
            return self.conv_flops[dtype]
        return self.peak(dtype)

    def bandwidth_for(self, nbytes: float) -> float:
        """Bytes/s of an operator that moves `nbytes`: read off the measured curve (log-
        linear between its points, its ends beyond them) where there is one, since an
        operator whose tensors stay in cache runs at the cache's bandwidth (the dev box: 140
        GB/s for 0.5 MB, 40 GB/s for 512 MB); else the profile's memory bandwidth."""
        curve = self.bandwidth_curve
        if not curve or nbytes <= 0:
            return self.memory_bandwidth
        sizes = [math.log(size) for size, _ in curve]
        rates = [rate for _, rate in curve]
        return float(np.interp(math.log(nbytes), sizes, rates))

    @property
    def ring_bandwidth(self) -> float:
        """Bytes/s one rank sends in a ring: half the vendor's both-directions figure."""
        return self.link_bandwidth / 2 if not self.measured else self.link_bandwidth


# What a profile's numbers may be: above 0, except these (at or above 0) and the
# efficiencies (a fraction of the peak: above 0, at most 1).
MAY_BE_ZERO = {("interconnect", "latency"), ("launch", "kernel")}
FRACTIONS = {("efficiency", "compute"), ("efficiency", "memory")}


def _value(table: dict[str, Any], section: str, key: str, where: str) -> tuple[float, str]:
    """The number and its source: a number a device can have, or in a profile measured when
    used (the CPU's) 0 as a placeholder (a NaN or a negative number is refused there too)."""
    try:
        entry = table[section][key]
        raw, source = entry["value"], str(entry["source"])
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise TypeError(f"value {raw!r} is not a number")
        value = float(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f'{where}: [{section}] {key} needs {{ value = NUMBER, source = "..." }} ({exc})'
        ) from None
    if not source.strip():
        raise DataError(f"{where}: [{section}] {key} has no source")
    if table.get("measured") is True and value == 0:
        return value, source  # a placeholder: measured when the profile is used
    if (section, key) in FRACTIONS:
        allowed, ok = "above 0 and at most 1", 0 < value <= 1
    elif (section, key) in MAY_BE_ZERO:
        allowed, ok = "0 or more", math.isfinite(value) and value >= 0
    else:
        allowed, ok = "a finite number above 0", math.isfinite(value) and value > 0
    if not ok:
        raise DataError(f"{where}: [{section}] {key} = {raw!r}: must be {allowed}")
    return value, source


def parse_profile(text: str, where: str) -> DeviceProfile:
    """A DeviceProfile from TOML text (DataError naming `where` when malformed)."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{where}: not valid TOML ({exc})") from None
    for key in ("name", "kind"):
        if not isinstance(table.get(key), str):
            raise DataError(f"{where}: needs a string '{key}'")
    if table["kind"] not in ("cpu", "cuda"):
        raise DataError(f"{where}: kind must be 'cpu' or 'cuda', got {table['kind']!r}")
    sources: dict[str, str] = {}
    peaks: dict[str, float] = {}
    for dtype in table.get("peak_flops") or {}:
        peaks[dtype], sources[f"peak_flops.{dtype}"] = _value(table, "peak_flops", dtype, where)
    if "fp32" not in peaks:
        raise DataError(f"{where}: [peak_flops] needs fp32")
    values = {}
    for section, key in REQUIRED:
        values[f"{section}.{key}"], sources[f"{section}.{key}"] = _value(table, section, key, where)
    return DeviceProfile(
        name=table["name"],
        title=str(table.get("title", table["name"])),
        kind=table["kind"],
        peak_flops=peaks,
        memory_bandwidth=values["memory.bandwidth"],
        memory_size=values["memory.size"],
        link_bandwidth=values["interconnect.bandwidth"],
        link_latency_s=values["interconnect.latency"],
        kernel_launch_s=values["launch.kernel"],
        compute_efficiency=values["efficiency.compute"],
        memory_efficiency=values["efficiency.memory"],
        link_name=str((table.get("interconnect") or {}).get("name", "")),
        measured=bool(table.get("measured", False)),
        sources=sources,
    )


def shipped_profiles() -> dict[str, DeviceProfile]:
    """The profiles shipped with lungbench, by name."""
    folder = resources.files("lungbench.predict") / "devices"
    found = {}
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if item.name.endswith(".toml"):
            profile = parse_profile(item.read_text(), f"lungbench profile {item.name}")
            found[profile.name] = profile
    return found


def load_profiles(files: list[str] | tuple[str, ...] = ()) -> dict[str, DeviceProfile]:
    """The shipped profiles and the user's `files` (a user's profile replaces a shipped one
    of the same name)."""
    profiles = shipped_profiles()
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"--device-file {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"--device-file {path}: not a UTF-8 text file ({exc})") from None
        profile = parse_profile(text, str(path))
        if profile.measured:  # it would be replaced by this machine's CPU, its numbers unused
            raise DataError(
                f"--device-file {path}: measured = true means 'this machine's CPU, measured "
                "when used' (the shipped cpu profile); a profile of another device needs "
                "measured = false and that device's numbers"
            )
        profiles[profile.name] = profile
    return profiles


def look_up_device(name: str, profiles: dict[str, DeviceProfile]) -> DeviceProfile:
    """The profile called `name`; a one-line UsageError listing the known ones otherwise."""
    if name in profiles:
        return profiles[name]
    raise UsageError(
        f"--device {name}: unknown device; known: {', '.join(sorted(profiles))} "
        "(add one with --device-file FILE.toml)"
    )


def measured_cpu(
    base: DeviceProfile,
    threads: int,
    peaks: dict[str, float],
    memory_bytes: float,
    comm: AlphaBeta | None = None,
    call_latency_s: float = 0.0,
    bandwidth_curve: tuple[tuple[float, float], ...] = (),
    conv_flops: dict[str, float] | None = None,
) -> DeviceProfile:
    """The `cpu` profile filled with this machine's measured numbers at `threads` threads
    (`comm`: the all-reduce's latency and bandwidth between processes here)."""
    comm = comm or AlphaBeta(0.0, 0.0)
    found = {d: peaks[d] for d in ("fp32", "bf16", "fp16") if peaks.get(d)}
    return replace(
        base,
        peak_flops=found,
        conv_flops=dict(conv_flops or {}),
        memory_bandwidth=peaks["copy_bytes_per_s"],
        bandwidth_curve=bandwidth_curve,
        memory_size=memory_bytes,
        link_bandwidth=comm.beta_bytes_per_s,
        link_latency_s=comm.alpha_s,
        kernel_launch_s=call_latency_s,
        threads=threads,
    )


def shared_by(alone: DeviceProfile, whole: DeviceProfile, processes: int) -> DeviceProfile:
    """One of `processes` ranks that run at once on this machine: each gets the peaks and
    bandwidth it has `alone`, but no more than its share of what the `whole` machine (every
    rank's threads busy) measured. Memory bandwidth is what ranks share first: on the dev box
    one thread copies 39 GB/s, two at once 65 GB/s, so each of 2 ranks gets 33."""
    if processes <= 1:
        return alone
    peaks = {
        d: min(v, whole.peak_flops.get(d, v * processes) / processes)
        for d, v in alone.peak_flops.items()
    }
    conv = {
        d: min(v, whole.conv_flops.get(d, v * processes) / processes)
        for d, v in alone.conv_flops.items()
    }
    bandwidth = min(alone.memory_bandwidth, whole.memory_bandwidth / processes)
    curve = tuple(
        (size, min(rate, whole.bandwidth_for(size) / processes))
        for size, rate in alone.bandwidth_curve
    )
    return replace(
        alone,
        peak_flops=peaks,
        conv_flops=conv,
        memory_bandwidth=bandwidth,
        bandwidth_curve=curve,
        title=f"{alone.title}, 1 of {processes} ranks sharing it",
    )


@contextlib.contextmanager
def at_threads(threads: int):
    """torch's intra-op threads set to `threads` inside, as before after."""
    from lungbench.measure.timing import set_threads

    before = torch.get_num_threads()
    set_threads(threads)
    try:
        yield
    finally:
        set_threads(before)


def measure_cpu_peaks(threads: int, refresh: bool = False) -> dict[str, float]:
    """FP32/bf16 matrix-product peaks and copy bandwidth at `threads` threads: this host's
    cached ones (lungbench.measure.peak_cache, busy or quiet: the same question gets the
    same answer) when there are some; else, or with `refresh`, measured and kept as that
    module keeps them (a quiet measurement replaces busy ones; a busy one cannot lower quiet
    ones)."""
    from lungbench.core.cache import read_cache, where_key
    from lungbench.measure.peak_cache import CACHE_FILE, robust_peaks

    with at_threads(threads):
        cached = read_cache(CACHE_FILE).get(where_key(torch.device("cpu"))) or {}
        if not refresh and cached.get("fp32") and cached.get("copy_bytes_per_s"):
            return _numbers(cached)
        log.info(f"measuring this CPU's peaks at {threads} thread(s) (about 5-20 s, once per host)")
        peaks, _source = robust_peaks(torch.device("cpu"), ("fp32", "bf16"))
    return peaks


def _numbers(entry: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in entry.items() if isinstance(v, (int, float))}


def _measured_busy(measure: Callable[[], Any]) -> tuple[Any, str | None]:
    """measure() inside a ContentionWatch: (its result, why the machine was busy or None)."""
    from lungbench.core.cache import busy_reason_of
    from lungbench.measure.contention import ContentionWatch

    watch = ContentionWatch().start()
    result = measure()
    return result, busy_reason_of(watch.stop())


def _kept(name: str, key: str, fresh: dict[str, Any], busy: str | None) -> dict[str, Any]:
    """Cache `fresh` under `key` of cache file `name` as lungbench.core.cache.kept_measurement
    keeps it (per value, the best of quiet ones); what the cache now holds."""
    from lungbench.core.cache import kept_measurement, read_cache, write_cache

    cache = read_cache(name)
    old = cache.get(key)
    if isinstance(old, list):  # a bandwidth curve in the layout before busy marks
        old = {str(float(a)): b for a, b in old}
    kept = kept_measurement(old, fresh, busy)
    cache[key] = kept
    write_cache(name, cache)
    return kept


# Bytes of each copy of the bandwidth curve: from within a core's L2 to far beyond any L3.
CURVE_COPY_BYTES = tuple(2**k for k in range(17, 30, 2))  # 128 KiB .. 512 MiB
CURVE_FILE = "bandwidth_curve.json"


def _curve_entry(entry: Any) -> bool:
    """{bytes moved: bytes/s} (with busy_reason), or the older list of [bytes, bytes/s]."""
    if isinstance(entry, list):
        return bool(entry) and all(
            len(p) == 2 and measured_number(p[0]) and measured_number(p[1]) for p in entry
        )
    return measured_numbers(entry) and all(
        k == "busy_reason" or measured_number(float(k)) for k in entry
    )


register_schema(CURVE_FILE, _curve_entry)


def measure_bandwidth_curve(threads: int, refresh: bool = False) -> tuple[tuple[float, float], ...]:
    """(bytes moved, bytes/s) of copies from cache-sized to DRAM-sized at `threads` threads:
    best of a few copies each, cached per host, thread count and torch version (marked busy
    when measured so, until a quiet measurement replaces it); `refresh` measures again."""
    from lungbench.core.cache import read_cache, where_key
    from lungbench.measure.peak import copy_bandwidth

    with at_threads(threads):
        key = where_key(torch.device("cpu"))
        cached = read_cache(CURVE_FILE).get(key)
        if isinstance(cached, list):  # the layout before busy marks: a quiet curve
            cached = {str(float(a)): b for a, b in cached}
        if cached and not refresh:
            return _curve(cached)
        cpu = torch.device("cpu")
        log.info(f"measuring the copy bandwidth curve at {threads} thread(s) (about 5-15 s, once)")
        repeats = [max(3, min(50, 2**26 // n)) for n in CURVE_COPY_BYTES]

        def copies() -> dict[str, float]:
            return {
                str(2.0 * n): copy_bandwidth(cpu, n, r)
                for n, r in zip(CURVE_COPY_BYTES, repeats, strict=True)
            }

        fresh, busy = _measured_busy(copies)
        return _curve(_kept(CURVE_FILE, key, fresh, busy))


def _curve(entry: dict[str, Any]) -> tuple[tuple[float, float], ...]:
    points = ((float(a), float(b)) for a, b in entry.items() if a != "busy_reason")
    return tuple(sorted(points))


CONV_FILE = "conv_rate.json"
register_schema(CONV_FILE, measured_numbers)


def measure_conv_rates(threads: int, refresh: bool = False) -> dict[str, float]:
    """{dtype: FLOP/s} of lungbench.measure.peak.conv_rate at `threads` threads (FP32, and
    bf16 where the CPU has it): the best of two measurements, cached per host, thread count
    and torch version (marked busy when measured so, until a quiet measurement replaces it);
    `refresh` measures again (predictions read ratios of these rates: one measured in a slow
    minute moved a 2-thread prediction by about 50% on the dev box)."""
    from lungbench.core.cache import read_cache, where_key
    from lungbench.measure.peak import conv_rate
    from lungbench.switches import bf16_supported

    with at_threads(threads):
        key = where_key(torch.device("cpu"))
        cached = read_cache(CONV_FILE).get(key)
        if cached and not refresh:
            return _numbers(cached)
        cpu = torch.device("cpu")
        log.info(f"measuring the convolution rate at {threads} thread(s) (about 5-15 s, once)")
        dtypes = ["fp32"] + (["bf16"] if bf16_supported(cpu) else [])

        def rates() -> dict[str, float]:
            return {d: max(conv_rate(cpu, d), conv_rate(cpu, d)) for d in dtypes}

        fresh, busy = _measured_busy(rates)
        return _numbers(_kept(CONV_FILE, key, fresh, busy))


def busy_measurements(threads: int) -> dict[str, str]:
    """{what: why} for each of this host's cached measurements at `threads` threads that
    was made on a busy machine (peaks, bandwidth curve, convolution rate): said with every
    answer made from them."""
    from lungbench.core.cache import read_cache, where_key
    from lungbench.measure.peak_cache import CACHE_FILE

    with at_threads(threads):
        key = where_key(torch.device("cpu"))
    found = {}
    for what, name in (("peaks", CACHE_FILE), ("bandwidth curve", CURVE_FILE),
                       ("convolution rate", CONV_FILE)):  # fmt: skip
        entry = read_cache(name).get(key)
        if isinstance(entry, dict) and entry.get("busy_reason"):
            found[what] = entry["busy_reason"]
    return found
