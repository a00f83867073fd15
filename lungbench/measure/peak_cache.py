"""Layer 6 (measure): the device's peaks, kept per host so a busy moment cannot lower them.

A peak measured while other processes use the cores comes out low (16-76 GFLOP/s FP32 on one
box), and every peak_fraction divided by it comes out high. So each run measures the peaks
inside a ContentionWatch: on a quiet machine the best of this measurement and the cached one
is kept and cached (per host, device and torch version); on a busy one the cached peaks are
used, and the environment record says which (`peak_source`).
"""

from __future__ import annotations

import logging

import torch

from lungbench.core.cache import read_cache, where_key, write_cache
from lungbench.measure.contention import ContentionWatch
from lungbench.measure.peak import device_peaks

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

CACHE_FILE = "peaks.json"


def robust_peaks(device: torch.device, dtypes: tuple[str, ...]) -> tuple[dict[str, float], str]:
    """(peaks, source): this run's measurement merged with the host's cached best when the
    machine is quiet; the cached peaks when it is busy (this run's if there are none)."""
    watch = ContentionWatch().start()
    fresh = device_peaks(device, dtypes)
    busy = watch.stop()["busy"]
    cache = read_cache(CACHE_FILE)
    key = where_key(device)
    cached = cache.get(key, {})
    if busy:
        if cached:
            log.warning("note: the machine is busy: using this host's cached peaks")
            return {**fresh, **cached}, "cache (machine busy now)"
        log.warning("note: peaks measured on a busy machine and no cached ones: they are low")
        return fresh, "measured on a busy machine"
    merged = dict(fresh)
    for name, value in cached.items():
        if not name.endswith("_spread") and value > merged.get(name, 0.0):
            merged[name] = value  # the best this host has done, quiet
    cache[key] = merged
    write_cache(CACHE_FILE, cache)
    return merged, "measured quiet; best of this run and the host's cache"
