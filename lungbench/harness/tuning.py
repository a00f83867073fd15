"""Layer 7 (harness): the "auto" switches, chosen by measurement where the run happens.

A fixed per-device table cannot know that bf16 autocast is 1.2x on one CPU and 0.89x on
another (AVX512-BF16 without AMX). So for a workload left on "auto", a short tuning pass
measures the candidate recipes on this device, interleaved (lungbench.harness.ablation's
runners: the same initial weights and batches for every candidate), checks each one's loss
after a few steps against eager FP32, and picks the fastest that passes:

  1. eager FP32 and each single switch on its own (channels_last_3d, foreach and fused Adam,
     bf16 / fp16 autocast where the device has them, TF32 + cudnn.benchmark and CUDA graphs
     on CUDA, torch.compile only when allowed: its first step costs minutes on a small CPU);
  2. when a single beats eager clearly (MIN_GAIN, in most rounds), a second interleaved pass
     of eager, the best single and (two or more winners) their combination: the choice must
     beat eager clearly again there, or eager FP32 stays.

Eager FP32 is always a candidate and a switch must beat it clearly twice, so the choice is
never slower than it beyond the noise of the passes. The choice is cached per host, device,
torch version and workload in `$LUNGBENCH_CACHE_DIR/tuning.json` (default
~/.cache/lungbench) and reused; `lungbench bench --retune` measures again. Every record
carries the choice and the measured alternatives.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from lungbench.core.cache import (
    measured_number,
    read_cache,
    register_schema,
    where_key,
    write_cache,
)
from lungbench.core.errors import message_of
from lungbench.core.runs import utc_now
from lungbench.harness.ablation import AblationConfig, Variant, one_off_words, run_ablation
from lungbench.measure.timing import STEP
from lungbench.measure.workload import Workload
from lungbench.switches import (
    Switches,
    adam_implementations,
    bf16_supported,
    compiler_available,
    eager_fp32,
    fast_defaults,
    has_auto,
)

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

CACHE_FILE = "tuning.json"
# Bump when a candidate's switches run differently, so choices made before are measured
# again (2: channels-last keeps a one-channel convolution's output channels-last; 3: fused
# Adam a CPU candidate, max-pools in bf16 under bf16 autocast; the key names the workload's
# threads, so a launcher's rank finds the choice one process made; 4: a switch must beat eager
# clearly, twice, see MIN_GAIN).
TUNING_VERSION = 4


def _tuning_entry(entry: Any) -> bool:
    """A cached choice: its name, switches Switches accepts, and alternatives whose times
    are measured numbers (their rows go into records as they are)."""
    Switches(**entry["switches"]).validate()
    return isinstance(entry["choice"], str) and all(
        _alternative(row) for row in entry.get("alternatives", ())
    )


def _alternative(row: Any) -> bool:
    loss = row.get("loss_delta")
    return (
        isinstance(row["name"], str)
        and measured_number(row["step_ms"])
        and measured_number(row["speedup_vs_eager"])
        and isinstance(row["accuracy_ok"], bool)
        and (loss is None or measured_number(abs(loss), zero=True))
        and ("one_off_s" not in row or _one_off_ok(row))
    )


def _one_off_ok(row: dict[str, Any]) -> bool:
    """A compiled candidate's one-off fields (ONE_OFF_FIELDS) as one_off_words reads them."""
    after = row.get("pays_off_after_steps")
    return (
        measured_number(row["one_off_s"], zero=True)
        and (after is None or _count(after))
        and isinstance(row.get("gain_against"), str)
    )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


register_schema(CACHE_FILE, _tuning_entry)


@dataclass(frozen=True)
class TuningOptions:
    """How hard to tune: rounds of the interleaved pass, the accuracy steps, and whether
    torch.compile may be a candidate (its compile time is paid during tuning)."""

    rounds: int = 5
    warmup: int = 1
    accuracy_steps: int = 3
    allow_compile: bool = False
    retune: bool = False  # measure again even if the cache has a choice


@dataclass(frozen=True)
class Tuning:
    """The measured fast choice for one workload on one device."""

    choice: str  # candidate name, e.g. "eager_fp32", "+bf16", "+bf16+foreach"
    switches: Switches
    source: str  # "measured" | "cache"
    alternatives: tuple[dict[str, Any], ...] = ()  # name, step_ms, speedup, accuracy_ok
    note: str = ""

    def record(self) -> dict[str, Any]:
        """Flat fields for a result record."""
        return {
            "tuning_choice": self.choice,
            "tuning_source": self.source,
            "tuning_alternatives": list(self.alternatives),
            "tuning_note": self.note,
        }


def candidates(device: torch.device, ndim: int = 5, allow_compile: bool = False) -> list[Variant]:
    """Eager FP32 and every single switch this device can run, each on its own."""
    cuda = device.type == "cuda"
    base = eager_fp32()
    singles: list[tuple[str, str, dict[str, Any]]] = []
    if ndim in (4, 5):
        fmt = "channels_last_3d" if ndim == 5 else "channels_last"
        singles.append((fmt, fmt, {"memory_format": fmt}))
    for impl in adam_implementations(device):
        singles.append((impl, f"{impl} Adam", {"optimizer": impl}))
    if bf16_supported(device):
        singles.append(("bf16", "bf16 autocast", {"dtype": "bf16"}))
    if cuda:
        singles.append(("fp16", "fp16 autocast + grad scaler", {"dtype": "fp16"}))
        singles.append(("tf32", "TF32 + cudnn.benchmark", {"tf32": True, "cudnn_benchmark": True}))
        singles.append(("cuda_graphs", "CUDA graphs", {"cuda_graphs": True}))
    if allow_compile and compiler_available(device) is None:
        singles.append(("compile", "torch.compile", {"compile": "default"}))
    return [Variant("eager_fp32", "baseline", base)] + [
        Variant(f"+{name}", added, replace(base, **change)) for name, added, change in singles
    ]


def combine(variants: Sequence[Variant]) -> Variant:
    """One variant with the switches of all of `variants` (each differs from eager FP32)."""
    base = eager_fp32()
    changes: dict[str, Any] = {}
    for v in variants:
        for name, value in asdict(v.switches).items():
            if value != getattr(base, name):
                changes[name] = value
    if changes.get("dtype") == "fp16" or changes.get("compile", "off") != "off":
        changes.pop("cuda_graphs", None)  # graphs cannot capture the scaler or compile's own
    name = "+" + "+".join(v.name.lstrip("+") for v in variants)
    return Variant(name, " + ".join(v.added for v in variants), replace(base, **changes))


# Switches of which a combination takes one value: two winners setting one of them (bf16 and
# fp16 both beating eager on a GPU, foreach and fused Adam on a CPU) are not both combined.
ONE_VALUE = {"dtype": "fp32", "optimizer": "default"}


def _one_value_each(winners: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The winners with only the fastest of those that set the same ONE_VALUE switch, so
    the combination runs what its name says."""
    for name, plain in ONE_VALUE.items():
        setting = [r for r in winners if r.get(f"{name}_used", plain) != plain]
        if len(setting) >= 2:
            keep = min(setting, key=lambda r: r["step_s_median"])
            winners = [r for r in winners if r not in setting or r is keep]
    return winners


# A candidate replaces eager FP32 only with a clear gain: at least MIN_GAIN in the median of
# the pass's paired per-round ratios (eager's step / the candidate's, round by round), and
# faster in at least MIN_ROUNDS_WON of the rounds; then again in a second pass. Why so much:
# eager FP32 against itself, in this pass's protocol (5 rounds), on the 2-core Zen 3 dev VM,
# 12 passes (bench f16 b2 and bench --to-quality's f4 depth-3 b16, 6 each): its paired
# medians read 0.94 to 1.10; 2 of 12 showed a "gain" of 3% or more in 4 of 5 rounds, 1 of 12
# one of 5% or more (9.8%). So one pass with a 3% margin keeps a switch that does nothing
# about one time in six; a 5% margin confirmed by a second pass, about one in a hundred.
MIN_GAIN = 0.05
MIN_ROUNDS_WON = 0.8


def clear_gain(record: dict[str, Any], eager: dict[str, Any]) -> bool:
    """True when `record` beat `eager` (the same pass's eager FP32) clearly (MIN_GAIN,
    MIN_ROUNDS_WON), round by round over their step samples."""
    base, mine = eager["samples_s"][STEP], record["samples_s"][STEP]
    ratios = [b / m for b, m in zip(base, mine, strict=True)]
    won = sum(r > 1 for r in ratios) / len(ratios)
    return statistics.median(ratios) >= 1 + MIN_GAIN and won >= MIN_ROUNDS_WON


def usable(record: dict[str, Any]) -> bool:
    """Its accuracy check passed and it ran as named (no fallback)."""
    return bool(record["accuracy_ok"]) and not record.get("switch_fallbacks")


def pick(measured: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fastest usable candidate (median step) with a clear gain over eager FP32 (the
    first), else eager FP32. `measured`: one pass's ablation records (variant,
    step_s_median, samples_s, accuracy_ok, switch_fallbacks)."""
    eager = measured[0]
    fit = [m for m in measured[1:] if usable(m) and clear_gain(m, eager)]
    return min(fit, key=lambda m: m["step_s_median"]) if fit else eager


def cached_tuning(
    workload: Workload, device: torch.device, shapes: Sequence[tuple[int, ...]] | None = None
) -> Tuning | None:
    """The choice a tuning pass cached for `workload` on this host, or None; never measures
    (under a launcher every rank must run the same switches, and no rank may stop to tune)."""
    entry = read_cache(CACHE_FILE).get(cache_key(workload, device, False, shapes))
    if entry is None:
        return None
    try:
        return Tuning(
            entry["choice"],
            Switches(**entry["switches"]),
            "cache",
            tuple(entry.get("alternatives", ())),
            f"measured {entry.get('measured_utc', '?')} in one process on this host",
        )
    except (KeyError, TypeError, AttributeError):  # an entry of another layout
        return None


def tune(
    workload: Workload,
    device: torch.device,
    options: TuningOptions = TuningOptions(),
    shapes: Sequence[tuple[int, ...]] | None = None,
) -> Tuning:
    """The measured fast choice for `workload` on `device`, from the cache when it has one
    (unless `options.retune`). `shapes`: per-sample input shapes (a store's; default: the
    registry's). A pass that fails (out of memory, a model that cannot run) is no choice:
    the device's table then, said in the note; the measurement itself records the failure."""
    key = cache_key(workload, device, options.allow_compile, shapes)
    cache = read_cache(CACHE_FILE)
    entry = cache.get(key)
    if entry is None:
        _note_other_versions(cache, key)
    if entry is not None and not options.retune:
        try:
            return Tuning(
                entry["choice"],
                Switches(**entry["switches"]),
                "cache",
                tuple(entry.get("alternatives", ())),
                f"measured {entry.get('measured_utc', '?')}; --retune measures again",
            )
        except (KeyError, TypeError, AttributeError):  # an entry of another layout
            log.warning("note: a tuning cache entry is unreadable; tuning again")
    try:
        tuning = _measure(workload, device, options, shapes)
    except Exception as exc:  # noqa: BLE001 - reported as the record's note, never fatal
        log.warning(f"note: tuning failed ({message_of(exc)}); 'auto' takes the device's table")
        return Tuning(
            "table", fast_defaults(device), "table", (), f"tuning failed: {message_of(exc)}"
        )
    cache[key] = {
        "choice": tuning.choice,
        "switches": asdict(tuning.switches),
        "alternatives": list(tuning.alternatives),
        "measured_utc": utc_now(),
        "torch": torch.__version__,
    }
    write_cache(CACHE_FILE, cache)
    return tuning


def _measure(
    workload: Workload,
    device: torch.device,
    options: TuningOptions,
    shapes: Sequence[tuple[int, ...]] | None,
) -> Tuning:
    shapes = tuple(tuple(s) for s in shapes) if shapes else None
    ndim = 1 + len(shapes[0] if shapes else workload.input_shapes(1)[0][1:])
    config = AblationConfig(
        workload,
        warmup=options.warmup,
        rounds=options.rounds,
        accuracy_steps=options.accuracy_steps,
        input_shapes=shapes,
    )
    w = workload
    log.info(
        f"tuning {w.model} {w.preset} f{w.filters}"
        f"{'' if w.depth is None else f' depth {w.depth}'} b{w.batch_size} on {w.device}: which "
        "switches are fastest here (once; cached, --retune measures again)"
    )
    with _quiet_ablation():
        first = run_ablation(
            config, candidates(device, ndim, options.allow_compile), label="tuning"
        )
    # each row's speed-up is against eager FP32 of its own interleaved pass
    rows = [_row(r, first[0]["step_s_median"], 1) for r in first]
    eager = first[0]
    # a candidate that fell back (bf16 on a layer its kernels get wrong, say) ran something
    # else than its name: it is shown, never chosen
    winners = _one_value_each([r for r in first[1:] if usable(r) and clear_gain(r, eager)])
    chosen = eager
    if winners:
        by_name = {v.name: v for v in candidates(device, ndim, options.allow_compile)}
        best = min(winners, key=lambda r: r["step_s_median"])
        recheck = [by_name["eager_fp32"], by_name[best["variant"]]]
        if len(winners) >= 2:
            recheck.append(combine([by_name[r["variant"]] for r in winners]))
        with _quiet_ablation():
            second = run_ablation(config, recheck, label="tuning")
        # The second pass confirms and decides: a gain one pass showed must show again
        # (one pass's noise can make one, see MIN_GAIN), and the second pass's times are
        # comparable among themselves (each row says its pass).
        rows += [_row(r, second[0]["step_s_median"], 2) for r in second]
        chosen = pick(second)
    rows = tuple(rows)
    switches = _switches_of(chosen)
    text = " | recheck: ".join(
        ", ".join(f"{r['name']} {r['step_ms']:.1f} ms{_flag(r)}" for r in rows if r["pass"] == n)
        for n in (1, 2)
        if any(r["pass"] == n for r in rows)
    )
    log.info(f"tuning: {text} -> {chosen['variant']}")
    return Tuning(chosen["variant"], switches, "measured", rows)


# What a compiled candidate's row keeps of its ablation record (harness.ablation)
ONE_OFF_FIELDS = ("one_off_s", "pays_off_after_steps", "gain_against")


def _row(record: dict[str, Any], eager_s: float, pass_: int) -> dict[str, Any]:
    return {
        "name": record["variant"],
        "pass": pass_,  # 1: eager and each switch alone; 2: eager, the best, the winners together
        "step_ms": 1e3 * record["step_s_median"],
        "speedup_vs_eager": eager_s / record["step_s_median"],
        "accuracy_ok": bool(record["accuracy_ok"]),
        "loss_delta": record["loss_delta"],
        "fell_back": "; ".join(record.get("switch_fallbacks") or ()) or None,
        # a compiled candidate: its one-off cost and when it pays off (harness.ablation)
        **{k: record[k] for k in ONE_OFF_FIELDS if k in record},
    }


@contextmanager
def _quiet_ablation() -> Iterator[None]:
    """The tuning pass prints its table, not each candidate's progress or fallback note
    (a fallback is in the table's `fell_back` column)."""
    logger = logging.getLogger("lungbench.harness.ablation")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _flag(row: dict[str, Any]) -> str:
    if row["fell_back"]:
        return " (fell back: not used)"
    if not row["accuracy_ok"]:
        return " (accuracy FAIL)"
    said = one_off_words(row)
    return f" (compile, one-off s: {said})" if said else ""


def _switches_of(record: dict[str, Any]) -> Switches:
    """What the candidate really ran (after any fallback, e.g. bf16 on an unsafe layer)."""
    names = [f.name for f in fields(Switches)]
    return Switches(**{n: record[f"{n}_used"] for n in names if f"{n}_used" in record})


# ------------------------------------------------------------------------------- the cache


def cache_key(
    workload: Workload,
    device: torch.device,
    allow_compile: bool = False,
    shapes: Sequence[tuple[int, ...]] | None = None,
) -> str:
    """Host, device, torch version and workload (with its input shapes and whether compile
    competed): a choice is reused only where and for what it was made. Without `shapes`
    the registry's for the workload (the same key as a store of those shapes)."""
    if not shapes:
        shapes = [s[1:] for s in workload.input_shapes(1)]
    w = workload
    where = where_key(device)
    if device.type == "cpu" and w.threads:  # the threads the pass runs at, not the caller's
        host, cpu, version = where.split("|")
        where = f"{host}|{cpu.rsplit(' x', 1)[0]} x{w.threads}|{version}"
    depth = "" if w.depth is None else f"|d{w.depth}"  # the model's default: no part
    return (
        f"{where}|{w.model}|{w.preset}"
        f"|f{w.filters}{depth}|b{w.batch_size}|t{w.threads}"
        f"|{'x'.join(map(str, shapes[0]))}"
        f"|{'compile' if allow_compile else 'eager'}|v{TUNING_VERSION}"
    )


def _note_other_versions(cache: dict[str, Any], key: str) -> None:
    """Say so when this workload was tuned here with another torch (that choice is not used)."""
    host, where, _, rest = key.split("|", 3)
    for other in cache:
        o_host, o_where, o_torch, o_rest = (other.split("|", 3) + ["", "", "", ""])[:4]
        if (o_host, o_where, o_rest) == (host, where, rest):
            log.info(f"note: this workload was tuned here with {o_torch}; tuning again")
            return


@dataclass
class Tuner:
    """Tunes each workload of a sweep once per device (a sweep repeats workloads)."""

    options: TuningOptions = field(default_factory=TuningOptions)
    done: dict[str, Tuning] = field(default_factory=dict)

    def __call__(
        self,
        workload: Workload,
        device: torch.device,
        shapes: Sequence[tuple[int, ...]] | None = None,
    ) -> Tuning:
        key = cache_key(workload, device, self.options.allow_compile, shapes)
        if key not in self.done:
            self.done[key] = tune(workload, device, self.options, shapes)
        return self.done[key]


def fast_choice(
    switches: Switches,
    workload: Workload,
    device: torch.device,
    tuner: Tuner,
    skip: str | None = None,
    shapes: Sequence[tuple[int, ...]] | None = None,
) -> tuple[Switches | None, dict[str, Any]]:
    """What a config's "auto" switches take, and the record fields saying so: the tuned
    choice for the workload on the device, or None (the device's table) when nothing is
    left to the device or the pass is skipped (`skip`: why, e.g. "--no-tune")."""
    if not has_auto(switches):
        return None, {}
    if skip is not None:
        return None, untuned(f"{skip}: the device's table (lungbench.step)")
    tuning = tuner(workload, device, shapes)
    return tuning.switches, tuning.record()


def untuned(why: str) -> dict[str, Any]:
    """The record fields of a run whose "auto" switches took the device's table."""
    return {
        "tuning_choice": None,
        "tuning_source": "table",
        "tuning_alternatives": [],
        "tuning_note": why,
    }
