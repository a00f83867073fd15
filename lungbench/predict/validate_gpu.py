"""Layer 8 (predict): `lungbench predict --validate --gpu`: the model's error on this GPU.

Two kinds of prediction are checked on a GPU node, the ones a user books with:

- GPU -> GPU: from one measured configuration on the GPU (a `lungbench bench --device cuda`
  record; its step shared among its operators by the roofline), the other batch sizes and
  widths, measured by the same bench run.
- CPU -> GPU: from the same configurations measured on this node's CPU (probed here), the
  GPU's step through the shipped profile of this GPU model (`profile_for_gpu`).

A GPU's step does not drift as a shared CPU's does, so targets are measured in one bench
run rather than in alternation. The cases are stored like the CPU validation's (kinds
"batch", "filters" and "device"): later predictions' intervals come from them.

    cases = run_gpu_validation(GPU_DEFAULT, bench_subprocess)      # a few minutes on one GPU
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lungbench.core.errors import UsageError
from lungbench.core.runs import utc_now
from lungbench.measure.workload import Protocol, Workload
from lungbench.predict import calibration
from lungbench.predict.ddp_probe import BenchLaunch, bench_args
from lungbench.predict.devices import load_profiles
from lungbench.predict.forecast import Predictor, Target, source_from_record
from lungbench.predict.validate import case

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPUPlan:
    """The source configuration and the targets of one GPU validation."""

    # its device: the accelerator ("cuda"; "cpu" only in tests, the flow without a GPU)
    source: Workload = Workload(filters=8, batch_size=4, device="cuda")
    protocol: Protocol = Protocol(warmup=5, repeats=20, epoch=False)
    batches: tuple[int, ...] = (2, 8, 16, 32)
    widths: tuple[int, ...] = (4, 16, 24)
    cpu_threads: int | None = None  # the CPU source's threads (None: every core)

    @property
    def device(self) -> str:
        return self.source.device


GPU_DEFAULT = GPUPlan()
GPU_QUICK = GPUPlan(
    Workload(preset="dey2018", filters=2, batch_size=2, device="cuda"),
    Protocol(warmup=1, repeats=3, epoch=False),
    batches=(3,),
    widths=(3,),
)


# Words of torch.cuda.get_device_name that name a shipped profile, most specific first.
GPU_NAMES = (
    (("h200",), "h200"),
    (("h100",), "h100-sxm"),
    (("a100", "80gb"), "a100-sxm-80gb"),
    (("a100",), "a100-sxm-40gb"),
    (("l40s",), "l40s"),
    (("v100",), "v100-sxm2"),
)


def profile_for_gpu(device_name: str) -> str | None:
    """The shipped profile of a GPU model ("NVIDIA H200" -> "h200"); None when none fits."""
    name = device_name.lower().replace(" ", "").replace("-", "")
    for words, profile in GPU_NAMES:
        if all(w in name for w in words):
            return profile
    return None


def run_gpu_validation(plan: GPUPlan, launch: BenchLaunch, out: Path | None = None) -> list[dict]:
    """Measure the GPU's configurations and the CPU's source, predict, compare: the cases
    (first a "source" row, as run_validation's)."""
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--validate --gpu: no CUDA device on this machine")
    gpu_records, gpu_environment = measure(plan, plan.device, launch, out)
    key = {(r["batch_size"], r["filters"]): r for r in gpu_records}
    w = plan.source
    source_record = key.get((w.batch_size, w.filters))
    if source_record is None:
        raise UsageError(
            f"--validate --gpu: the {plan.device} bench measured no source configuration "
            f"(f{w.filters} b{w.batch_size}); see the warnings above"
        )
    predictor = Predictor(launch=launch)
    source = source_from_record(source_record, gpu_environment, "GPU validation")
    cases: list[dict[str, Any]] = [
        {"kind": "source", "target": f"{w.preset} f{w.filters} b{w.batch_size} on "
         f"{plan.device}", "measured_s": source_record["step_s_median"],
         "note": "GPU targets from one bench run; CPU -> GPU through the GPU's profile"},
    ]  # fmt: skip
    for kind, target in targets(plan):
        pred = predictor.predict(source, target)
        measured = key.get((pred.batch, pred.filters), {}).get("step_s_median")
        label = f"{plan.device} f{pred.filters} b{pred.batch}"
        cases.append(case(kind, label, pred, measured))
    cases += cpu_to_gpu_cases(plan, key, predictor, out)
    calibration.save_cases([c for c in cases if c["kind"] != "source"], utc_now())
    return cases


def targets(plan: GPUPlan) -> list[tuple[str, Target]]:
    cases = [("batch", Target(batch=b)) for b in plan.batches]
    return cases + [("filters", Target(filters=f)) for f in plan.widths]


def cpu_to_gpu_cases(
    plan: GPUPlan, gpu: dict[tuple[int, int], dict], predictor: Predictor, out: Path | None
) -> list[dict[str, Any]]:
    """The GPU's steps predicted from this node's CPU through the GPU model's profile."""
    name = torch.cuda.get_device_name() if plan.device == "cuda" else plan.device
    profile = profile_for_gpu(name)
    if profile is None or profile not in load_profiles():
        log.warning(f"note: no shipped profile for {name!r}: CPU -> GPU not validated")
        return []
    records, environment = measure(
        replace(plan, batches=(), widths=()), "cpu", predictor.launch, out
    )
    cases = []
    for record in records:
        config = (record["batch_size"], record["filters"])
        measured = gpu.get(config, {}).get("step_s_median")
        source = source_from_record(record, environment, "GPU validation (CPU source)")
        pred = predictor.predict(source, Target(device=profile))
        cases.append(case("device", f"cpu -> {profile} f{config[1]} b{config[0]}", pred, measured))
    return cases


def measure(
    plan: GPUPlan, device: str, launch: BenchLaunch | None, out: Path | None
) -> tuple[list[dict], dict]:
    """(ok records, environment) of the source and its targets on `device`: one bench of
    the batches at the source's width, one of the widths at its batch."""
    log.info(f"measuring the validation's configurations on {device} (lungbench bench)")
    threads = plan.cpu_threads if device == "cpu" else None
    source = replace(plan.source, device=device, threads=threads)
    grids = [
        (sorted({source.batch_size, *plan.batches}), [source.filters]),
        ([source.batch_size], sorted({source.filters, *plan.widths})),
    ]
    records: list[dict] = []
    seen: set[tuple[int, int]] = set()  # (batch, filters) already in records
    environment: dict = {}
    for i, (batches, widths) in enumerate(grids):
        if len(batches) == 1 and len(widths) == 1 and records:
            continue  # the source alone: measured by the first run already
        args = [*bench_args(source, plan.protocol, batches, widths), "--no-tune"]
        if launch is None:
            break
        found, environment = launch(args, 1, None if out is None else out / f"{device}-{i + 1}")
        for record in found:
            config = (record["batch_size"], record["filters"])
            if record.get("world_size", 1) == 1 and config not in seen:
                seen.add(config)
                records.append(record)
    return records, environment
