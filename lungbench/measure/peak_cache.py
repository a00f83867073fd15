"""Layer 6 (measure): the device's peaks, kept per host so a busy moment cannot lower them.

A peak measured while other processes use the cores comes out low (16-76 GFLOP/s FP32 on one
box), and every peak_fraction divided by it comes out high. So each run measures the peaks
inside a ContentionWatch and keeps them per host, device and torch version
(lungbench.core.cache.kept_measurement): on a quiet machine the best of this measurement and
the cached quiet one; on a busy one the cached quiet peaks when there are some, else this
measurement, cached and marked busy until a quiet run replaces it. The environment record
says which (`peak_source`).
"""

from __future__ import annotations

import logging

import torch

from lungbench.core.cache import (
    busy_reason_of,
    kept_measurement,
    measured_numbers,
    read_cache,
    register_schema,
    where_key,
    write_cache,
)
from lungbench.measure.contention import ContentionWatch
from lungbench.measure.peak import device_peaks

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

CACHE_FILE = "peaks.json"
register_schema(CACHE_FILE, measured_numbers)


def robust_peaks(device: torch.device, dtypes: tuple[str, ...]) -> tuple[dict[str, float], str]:
    """(peaks, source): what this host's cache keeps after this measurement (see the module),
    and in words which peaks those are."""
    watch = ContentionWatch().start()
    fresh = device_peaks(device, dtypes)
    busy = busy_reason_of(watch.stop())
    cache = read_cache(CACHE_FILE)
    key = where_key(device)
    cached = cache.get(key)
    kept = kept_measurement(cached, fresh, busy)
    cache[key] = kept
    write_cache(CACHE_FILE, cache)
    peaks = {**fresh, **{k: v for k, v in kept.items() if k != "busy_reason"}}
    if busy is None:
        return peaks, "measured quiet; best of this run and the host's cache"
    if kept.get("busy_reason") is None:
        log.warning("note: the machine is busy: using this host's cached peaks")
        return peaks, "cache (machine busy now)"
    log.warning("note: peaks measured on a busy machine (no quiet ones cached): they are low")
    return peaks, f"measured on a busy machine ({busy}); cached, marked busy"
