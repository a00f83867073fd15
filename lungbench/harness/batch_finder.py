"""Layer 7 (harness): The largest batch that fits: doubling, then bisection, with out-of-memory caught.

`find_max_batch(fits)` needs only a predicate "does a training step at batch b fit?":
batches 1, 2, 4, ... are tried until one fails (or `limit` is reached), then the gap between
the last that fit and the first that failed is bisected. `training_trial()` makes that
predicate from a model: one full training step (forward, backward, optimizer, with the
run's switches) on random inputs; an out-of-memory error (torch.cuda.OutOfMemoryError, a
RuntimeError saying "out of memory", or a CPU allocator failure) means "does not fit", and
the allocator is cleaned (gc + empty_cache) after every trial so failures do not accumulate.

On CPU the operating system kills a process long before the allocator raises, so a trial
whose predicted memory (activations saved for backward, measured at batch 1, times the
batch) exceeds CPU_RAM_FRACTION of the available RAM counts as "does not fit" unrun.

    lungbench bench --find-batch --device cuda --filters 8 16 --batch 2
        finds the largest batch per model, filters, grid and dtype (tables/max_batch.csv),
        drops requested batches above it and adds the largest batch itself to the sweep.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import psutil
import torch
from torch import nn

from lungbench.core.errors import is_oom
from lungbench.step import NO_TIMER, TrainStep
from lungbench.switches import Switches, backend_flags, resolve_switches

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

# A CPU trial may use at most this share of the available RAM (predicted; see the docstring).
CPU_RAM_FRACTION = 0.5


# Default search ceilings: CPU steps at large batches take minutes, GPUs hold thousands.
DEFAULT_LIMIT = {"cpu": 64, "cuda": 4096}


@dataclass(frozen=True)
class BatchSearch:
    """The result of a search: the largest batch that fit and every trial made."""

    largest: int  # 0 when not even `start` fits
    first_failure: int | None  # smallest batch seen not to fit; None when `limit` fit
    limit: int
    tried: tuple[tuple[int, bool], ...]

    @property
    def capped(self) -> bool:
        """True when the search stopped at `limit` without finding the memory wall."""
        return self.first_failure is None


def free_memory(device: torch.device) -> None:
    """Drop unreachable tensors and give cached blocks back (after an OOM they linger)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def find_max_batch(fits: Callable[[int], bool], start: int = 1, limit: int = 1024) -> BatchSearch:
    """Largest b in [start, limit] with fits(b), assuming fits is monotone (doubling, then
    bisection). `fits` is called O(log limit) times."""
    if start < 1 or limit < start:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    tried: list[tuple[int, bool]] = []

    def check(b: int) -> bool:
        ok = bool(fits(b))
        tried.append((b, ok))
        return ok

    good, bad = 0, None
    b = start
    while b <= limit:
        if not check(b):
            bad = b
            break
        good, b = b, b * 2
    if bad is None and good < limit:  # doubling overshot the limit: try the limit itself
        if check(limit):
            good = limit
        else:
            bad = limit
    if bad is not None and good:
        while bad - good > 1:
            mid = (good + bad) // 2
            if check(mid):
                good = mid
            else:
                bad = mid
    return BatchSearch(good, bad, limit, tuple(tried))


def saved_bytes_per_sample(
    step: TrainStep, shapes: Sequence[tuple[int, ...]], device: torch.device
) -> int:
    """Bytes of tensors autograd saves for backward at batch 1 (the activations)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    inputs = step.prepare_inputs([torch.rand((1, *s), device=device) for s in shapes])
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast(device.type, enabled=False),
    ):
        # An FP32 forward over-estimates a bf16 one: safe for a budget.
        out = step.model(*inputs)
    del out
    step.model.zero_grad(set_to_none=True)
    return total


def training_trial(
    model: nn.Module,
    shapes: Sequence[tuple[int, ...]],
    device: torch.device,
    switches: Switches,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ram_budget: float | None = None,
) -> Callable[[int], bool]:
    """fits(batch): one training step of `model` at `batch` (random inputs of per-sample
    `shapes`) ran without running out of memory. CUDA graphs and compile are not used
    (shapes change every trial); memory format and autocast dtype are."""
    from lungbench.step import bce_loss

    switches = replace(switches, compile="off", cuda_graphs=False)
    step = TrainStep(model.to(device).train(), loss_fn or bce_loss, switches, device)
    per_sample = 0
    if device.type == "cpu":
        per_sample = saved_bytes_per_sample(step, shapes, device)
        if ram_budget is None:
            ram_budget = CPU_RAM_FRACTION * psutil.virtual_memory().available

    def fits(batch: int) -> bool:
        if ram_budget is not None and per_sample * batch > ram_budget:
            return False  # predicted not to fit: never run it (the OS would kill us)
        try:
            inputs = step.prepare_inputs([torch.rand((batch, *s), device=device) for s in shapes])
            target = torch.randint(0, 2, (batch,), device=device).float()
            with backend_flags(switches):
                step(NO_TIMER, inputs, target)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # an asynchronous failure surfaces here
            return True
        except Exception as exc:  # noqa: BLE001 - only OOM is "does not fit"
            if not is_oom(exc):
                raise
        finally:
            step.optimizer.zero_grad(set_to_none=True)
            inputs = target = None  # noqa: F841 - release before cleaning the allocator
        # Out of memory: the traceback's frames held tensors; collect them and give the
        # allocator's cached blocks back before the next (smaller) trial. (Only here: a
        # full gc pass costs ~0.5 s with torch loaded.)
        free_memory(device)
        return False

    return fits


def family(cfg: Any) -> tuple:
    """What the largest batch depends on: model, preset (grid), filters, device, switches."""
    w, sw = cfg.workload, cfg.switches
    return (w.model, w.preset, w.filters, w.device, sw.dtype, sw.memory_format)


def find_for_config(
    cfg: Any, shapes: Sequence[tuple[int, ...]], limit: int | None = None
) -> dict[str, Any]:
    """The search for one configuration family, as a record."""
    from lungbench.core.device import parse_device

    w = cfg.workload
    device = parse_device(w.device)
    limit = limit or DEFAULT_LIMIT[device.type]
    model = w.build_model(device)
    probe = (model, [torch.zeros((1, *s), device=device) for s in shapes])
    resolved = resolve_switches(cfg, device, 1 + len(shapes[0]), quiet=True, probe=probe)
    search = find_max_batch(training_trial(model, shapes, device, resolved.switches), limit=limit)
    del model
    free_memory(device)
    return {
        "model": w.model,
        "preset": w.preset,
        "grid": "x".join(map(str, shapes[0][1:])),
        "filters": w.filters,
        "device": w.device,
        "dtype": cfg.switches.dtype,
        "dtype_used": resolved.switches.dtype,
        "memory_format_used": resolved.switches.memory_format,
        "max_batch": search.largest,
        "first_oom": search.first_failure,
        "limit": search.limit,
        "capped": search.capped,
        "tried": " ".join(f"{b}{'' if ok else '!'}" for b, ok in search.tried),
    }


def cap_configs(configs: Sequence[Any], limits: dict[tuple, int]) -> list[Any]:
    """Configs with batch <= their family's largest batch, plus that largest batch itself
    (after the family's last kept config, so the sweep order is kept)."""

    def batch(c: Any) -> int:
        return c.workload.batch_size

    def group(c: Any) -> tuple:
        return family(c), c.workload.threads

    out = [c for c in configs if batch(c) <= limits.get(family(c), batch(c))]
    groups = {group(c): c for c in configs}  # last config of each group
    for (fam, threads), cfg in groups.items():
        largest = limits.get(fam)
        members = [i for i, c in enumerate(out) if group(c) == (fam, threads)]
        if not largest or any(batch(out[i]) == largest for i in members):
            continue
        at = members[-1] + 1 if members else len(out)
        out.insert(at, cfg.with_workload(batch_size=largest))
    return out


def apply_batch_finder(
    configs: Sequence[Any],
    shapes: Sequence[tuple[int, ...]],
    limit: int | None = None,
) -> tuple[list[Any], pd.DataFrame]:
    """`--find-batch`: search each family; the capped configs and the table (max_batch)."""
    rows, limits = [], {}
    for cfg in {family(c): c for c in configs}.values():
        w = cfg.workload
        log.info(
            f"find-batch: {w.model} {w.preset} f{w.filters} on {w.device} ({cfg.switches.dtype})"
        )
        row = find_for_config(cfg, shapes, limit)
        rows.append(row)
        limits[family(cfg)] = row["max_batch"]
        log.info(
            f"find-batch: largest batch {row['max_batch']}"
            + (
                f" (limit {row['limit']} reached)"
                if row["capped"]
                else f" ({row['first_oom']} ran out of memory)"
            )
        )
    return cap_configs(configs, limits), pd.DataFrame(rows)
