"""A whole `lungbench bench` run: validate, prepare data, sweep, write and publish results.

Everything the user asked for is checked before the run folder is created, so bad input
leaves nothing behind; a run that fails or is interrupted later is marked so in run.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lungbench.data.store import StoreInfo, read_info
from lungbench.env import describe_device, environment_record
from lungbench.errors import DataError, UsageError, look_up_option
from lungbench.harness import (
    BenchConfig,
    SweepSpec,
    default_store_path,
    parse_device,
    run_sweep,
)
from lungbench.models import create_model, list_models
from lungbench.models.dualpath3d import GEOMETRY_PRESETS, geometry
from lungbench.peak import matmul_peak_flops
from lungbench.report.bench_outputs import write_bench_outputs
from lungbench.results import append_record, create_run_dir, finish_run, write_json


@dataclass(frozen=True)
class BenchRequest:
    """What the user asked `lungbench bench` for (saved as config.json)."""

    model: str = "dualpath3d"
    preset: str = "default"
    filters: tuple[int, ...] = (8, 16)
    batch_sizes: tuple[int, ...] = (2, 4, 8)
    devices: tuple[str, ...] = ("cpu",)
    threads: tuple[int | None, ...] = (None,)
    warmup: int = 3
    repeats: int = 10
    epoch: bool = True
    epoch_samples: int | None = None
    num_workers: int = 0
    seed: int = 0
    store: Path | None = None
    synth_n: int = 754
    out: Path = Path("results")
    run_id: str | None = None

    def sweep(self) -> SweepSpec:
        base = BenchConfig(model=self.model, preset=self.preset, warmup=self.warmup,
                           repeats=self.repeats, epoch=self.epoch,
                           epoch_samples=self.epoch_samples, num_workers=self.num_workers,
                           seed=self.seed)
        return SweepSpec(base=base, filters=self.filters, batch_sizes=self.batch_sizes,
                         devices=self.devices, threads=self.threads)


@dataclass
class BenchResult:
    run_dir: Path
    records: list[dict[str, Any]]
    table_text: str


def validate(request: BenchRequest) -> None:
    """UsageError for anything invalid, before any file is written."""
    look_up_option(request.model, list_models(), what="--model")
    look_up_option(request.preset, GEOMETRY_PRESETS, what="--preset")
    for device in request.devices:
        parse_device(device)
    if request.out.exists() and not request.out.is_dir():
        raise UsageError(f"--out {request.out}: exists and is not a directory")
    if request.store is not None:
        check_store_fits_model(request, read_info(request.store))


def check_store_fits_model(request: BenchRequest, info: StoreInfo) -> None:
    """DataError unless the model takes one sample of each store input (a dry forward)."""
    model = create_model(request.model, preset=request.preset, filters=min(request.filters))
    inputs = [torch.zeros((1, *shape)) for shape in info.inputs.values()]
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    except (RuntimeError, TypeError, ValueError) as exc:
        shapes = ", ".join(f"dataset '{k}' has shape {(info.n, *v)}" for k, v in info.inputs.items())
        reason = str(exc).splitlines()[0][:160]
        raise DataError(f"{info.path}: {shapes}; model {request.model!r} (preset "
                        f"{request.preset!r}) cannot take it: {reason}") from None


def prepare_store(request: BenchRequest, log: Callable[[str], None]) -> StoreInfo:
    """The user's store, or the generated default (made once, then reused from OUT/data/)."""
    if request.store is not None:
        return read_info(request.store)
    path = default_store_path(request.out, "lidc", request.synth_n, request.preset, request.seed)
    if not path.exists():
        from lungbench.data.synth import write_synthetic_store

        log(f"generating {request.synth_n} LIDC-like nodules into {path} (once; reused later)")
        with tqdm(total=request.synth_n, desc="generate data", unit="nodule") as bar:
            write_synthetic_store(path, "lidc", request.synth_n, geometry(request.preset),
                                  seed=request.seed, progress=bar.update)
    return read_info(path)


def measure_peaks(devices: tuple[str, ...]) -> dict[str, float]:
    """FP32 matrix-product peak per device, the denominator of every 'peak_fraction'."""
    return {d: matmul_peak_flops(parse_device(d), "fp32") for d in dict.fromkeys(devices)}


def run_bench(request: BenchRequest, log: Callable[[str], None] = print) -> BenchResult:
    """Run the sweep described by `request` and write its result folder."""
    validate(request)
    info = prepare_store(request, log)
    configs = request.sweep().expand()
    run_dir = create_run_dir(request.out, "bench", request.run_id)
    try:
        write_json(run_dir / "config.json", {"request": request, "store": str(info.path),
                                             "store_inputs": info.inputs,
                                             "store_kind": info.kind,
                                             "configs": len(configs)})
        peaks = measure_peaks(request.devices)
        env = environment_record()
        env["peak_flops_fp32"] = peaks
        write_json(run_dir / "environment.json", env)

        bar = tqdm(total=len(configs), desc="bench", unit="config")

        def on_record(record: dict[str, Any]) -> None:
            device = torch.device(record["device"])
            record["platform"] = _platform(record, device)
            peak = peaks.get(record["device"])
            if record.get("achieved_flops") and peak:
                record["peak_flops"] = peak
                record["peak_fraction"] = record["achieved_flops"] / peak
            append_record(run_dir, record)
            bar.update(1)

        def progress(cfg: BenchConfig) -> None:
            bar.set_postfix_str(f"{cfg.device} f{cfg.filters} b{cfg.batch_size}")

        with bar:
            records = run_sweep(configs, info, on_record, progress)
        table_text = write_bench_outputs(run_dir, records)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        finish_run(run_dir, status=status, error=str(exc).splitlines()[0] if str(exc) else "")
        raise
    finish_run(run_dir, "complete")
    return BenchResult(run_dir, records, table_text)


def _platform(record: dict[str, Any], device: torch.device) -> str:
    if device.type == "cpu":
        return f"cpu ({record['threads_used']} threads)"
    return describe_device(device)
