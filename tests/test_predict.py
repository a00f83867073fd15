"""`lungbench predict`: the per-operator model on planted tables, per-operator counts against
FlopCounterMode, the ring all-reduce, the alpha-beta fit, the device profiles, the bad
inputs, and `predict --validate --quick` end to end."""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lungbench.cli import OneLineParser
from lungbench.commands import predict as predict_command
from lungbench.commands._launch import bench_subprocess
from lungbench.core.errors import DataError, UsageError
from lungbench.measure.allreduce import AlphaBeta, fit_alpha_beta
from lungbench.measure.timing import OpCall
from lungbench.measure.workload import Workload
from lungbench.predict.comm import bucket_bytes, comm_estimate, ring_allreduce_s
from lungbench.predict.ddp_probe import overhead_of
from lungbench.predict.devices import (
    DeviceProfile,
    load_profiles,
    look_up_device,
    parse_profile,
    shared_by,
    shipped_profiles,
)
from lungbench.predict.model import fixed_costs, roof_s, scale_step
from lungbench.predict.operators import count_operators
from lungbench.switches import Switches

TINY = Workload(preset="dey2018", filters=2, batch_size=2)


def device(peak: float, bandwidth: float, kind: str = "cpu", name: str = "d") -> DeviceProfile:
    return DeviceProfile(
        name=name, title=name, kind=kind, peak_flops={"fp32": peak},
        memory_bandwidth=bandwidth, memory_size=0.0, link_bandwidth=0.0, link_latency_s=0.0,
        kernel_launch_s=1e-6, compute_efficiency=0.5, memory_efficiency=1.0,
    )  # fmt: skip


# ---- the per-operator model on planted tables ----------------------------------------------


def test_bounds_of_a_planted_call_by_hand():
    call = OpCall("aten.convolution", flops=2e9, bytes=1e8, dtype="fp32")
    # 2 GFLOP at 100 GFLOP/s = 20 ms; 100 MB at 10 GB/s = 10 ms
    assert roof_s(call, device(100e9, 10e9)) == pytest.approx((0.02, 0.01))


def test_planted_table_scaled_by_the_limiting_bound():
    src = device(100e9, 10e9)
    calls = [
        OpCall("aten.convolution", 2e9, 1e8, "fp32", "forward", 0.040),  # compute: 20 ms bound
        OpCall("aten.relu", 0.0, 2e8, "fp32", "forward", 0.030),  # memory: 20 ms bound
    ]
    target = [
        OpCall("aten.convolution", 4e9, 2e8, "fp32", "forward"),  # twice the batch
        OpCall("aten.relu", 0.0, 4e8, "fp32", "forward"),
    ]
    est = scale_step(calls, src, target, src, overhead_s=0.005, call_latency_s=0.0)
    # each call's measured time doubles with its limiting bound; the overhead stays
    assert est.step_s == pytest.approx(0.005 + 2 * 0.040 + 2 * 0.030)
    assert est.parts == pytest.approx({"compute": 0.08, "memory": 0.06, "latency": 0.005})
    assert est.bound == "compute"
    # a device with twice the peak halves the compute-bound call only (its new bound, 10 ms,
    # still limits it); the relu's bound is unchanged
    fast = device(200e9, 10e9)
    est = scale_step(calls, src, calls, fast, overhead_s=0.0, call_latency_s=0.0)
    assert est.step_s == pytest.approx(0.020 + 0.030)


def test_a_measured_kernel_ratio_replaces_the_bounds():
    """A call with a measured ratio takes its whole source time times that ratio (the bounds
    would have said 2x); a call without one (None) is scaled by its bounds as before."""
    src = device(100e9, 10e9)
    calls = [
        OpCall("aten.convolution", 2e9, 1e8, "fp32", "forward", 0.040, "[1]"),
        OpCall("aten.relu", 0.0, 2e8, "fp32", "forward", 0.030),
    ]
    target = [
        OpCall("aten.convolution", 4e9, 2e8, "fp32", "forward", 0.0, "[2]"),
        OpCall("aten.relu", 0.0, 4e8, "fp32", "forward"),
    ]

    def measured(was, will):
        return 3.0 if was.signature else None

    est = scale_step(calls, src, target, src, 0.005, 0.0, kernel_ratio=measured)
    assert est.step_s == pytest.approx(0.005 + 3 * 0.040 + 2 * 0.030)
    assert est.phases == pytest.approx({"forward": 3 * 0.040 + 2 * 0.030})


def test_fixed_cost_from_two_probe_sizes():
    src = device(1e9, 1e12)
    small = [OpCall("aten.mm", 1e6, 0.0, "fp32", "", 0.003)]  # roof 1 ms
    large = [OpCall("aten.mm", 2e6, 0.0, "fp32", "", 0.004)]  # roof 2 ms
    # line through (1 ms, 3 ms) and (2 ms, 4 ms): slope 1, intercept 2 ms
    assert fixed_costs(small, large, src, 0.0) == pytest.approx([0.002])
    target = [OpCall("aten.mm", 4e6, 0.0, "fp32")]  # roof 4 ms -> 2 + 4 = 6 ms
    est = scale_step(small, src, target, src, 0.0, 0.0, reference=large)
    assert est.step_s == pytest.approx(0.006)
    # the same line from the other side: the large call the source, the small its reference
    assert fixed_costs(large, small, src, 0.0) == pytest.approx([0.002])
    half = [OpCall("aten.mm", 0.5e6, 0.0, "fp32")]  # roof 0.5 ms -> 2 + 0.5 = 2.5 ms
    est = scale_step(large, src, half, src, 0.0, 0.0, reference=small)
    assert est.step_s == pytest.approx(0.0025)


def test_across_kinds_is_launch_bound_when_the_host_is_slower():
    calls = [OpCall("aten.add", 1.0, 1e3, "fp32", "forward", 1e-5)] * 10
    gpu = device(1e13, 1e12, kind="cuda", name="gpu")
    est = scale_step(calls, device(1e9, 1e9), calls, gpu, overhead_s=1e-4, call_latency_s=1e-5)
    # host: 10 calls x (10 us + 100 us / 10) = 200 us; kernels: 10 x 1 us + tiny
    assert est.step_s == pytest.approx(2e-4)
    assert est.bound == "latency"


# ---- per-operator counts against FlopCounterMode -------------------------------------------


@pytest.mark.parametrize("batch", [2, 4])
def test_per_operator_flops_match_flop_counter_mode(batch):
    work = Workload(preset="dey2018", filters=2, batch_size=batch)
    calls = count_operators(work, Switches())
    model = work.build_model(torch.device("cpu"))
    inputs, target = work.random_batch(torch.device("cpu"))
    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.binary_cross_entropy_with_logits(
            model(*inputs).reshape(target.shape), target
        ).backward()
    expected = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    ours: dict[str, float] = {}
    for c in calls:
        if c.flops:
            ours[c.name] = ours.get(c.name, 0) + c.flops
    assert ours == pytest.approx(expected)


def test_batch_scaling_of_flops_and_bytes_per_operator():
    two = count_operators(TINY, Switches())
    four = count_operators(Workload(preset="dey2018", filters=2, batch_size=4), Switches())
    assert [c.name for c in two] == [c.name for c in four]
    convs = [(a, b) for a, b in zip(two, four, strict=True) if a.name == "aten.convolution"]
    assert convs and all(b.flops == pytest.approx(2 * a.flops) for a, b in convs)
    # bytes grow with the batch, but less than 2x: the weights do not grow
    assert all(a.bytes < b.bytes < 2 * a.bytes for a, b in convs)
    adam = [(a, b) for a, b in zip(two, four, strict=True) if a.phase == "optimizer"]
    assert adam and all(a.bytes == b.bytes for a, b in adam)  # optimizer state: no batch


# ---- communication --------------------------------------------------------------------------


def test_ring_allreduce_hand_worked():
    # 4 ranks, 100 MB, 10 GB/s, 10 us: 2*3/4 * 100e6 / 10e9 + 2*3 * 10 us = 15 ms + 60 us
    assert ring_allreduce_s(100e6, 4, 10e-6, 10e9) == pytest.approx(0.01506)
    assert ring_allreduce_s(100e6, 1, 10e-6, 10e9) == 0.0


def test_exposed_communication_hides_all_but_the_last_bucket():
    link = AlphaBeta(0.0, 1e9)
    # 2 ranks: t = bytes / beta; buckets 1 MB and 3 MB -> 1 ms + 3 ms
    full = comm_estimate([1e6, 3e6], 2, link, backward_s=1.0, overlap=1.0)
    assert (full.total_s, full.exposed_s) == pytest.approx((0.004, 0.003))
    none = comm_estimate([1e6, 3e6], 2, link, backward_s=1.0, overlap=0.0)
    assert none.exposed_s == pytest.approx(0.004)


def test_ranks_side_by_side_share_the_whole_machine_by_hand():
    # alone: 100 GFLOP/s, 40 GB/s; the whole machine (both ranks' threads): 180, 60.
    alone, whole = device(100e9, 40e9), device(180e9, 60e9)
    shared = shared_by(alone, whole, 2)
    assert shared.peak("fp32") == pytest.approx(90e9)  # min(100, 180 / 2)
    assert shared.memory_bandwidth == pytest.approx(30e9)  # min(40, 60 / 2)
    assert shared_by(alone, device(300e9, 100e9), 2).memory_bandwidth == 40e9  # its own
    assert shared_by(alone, whole, 1) is alone


def test_convolutions_bounded_by_the_measured_convolution_rate():
    from dataclasses import replace

    # matrix-product peak 100 GFLOP/s, a 3D convolution measured at 25 GFLOP/s
    cpu = replace(device(100e9, 1e15), conv_flops={"fp32": 25e9})
    conv = OpCall("aten.convolution_backward", flops=1e9, bytes=0.0, dtype="fp32")
    mm = OpCall("aten.mm", flops=1e9, bytes=0.0, dtype="fp32")
    assert roof_s(conv, cpu)[0] == pytest.approx(0.04)  # 1 GFLOP / 25 GFLOP/s
    assert roof_s(mm, cpu)[0] == pytest.approx(0.01)  # the product's peak
    assert roof_s(conv, device(100e9, 1e15))[0] == pytest.approx(0.01)  # none measured
    bf16 = replace(conv, dtype="bf16")  # a dtype without a measured rate: the peak
    assert roof_s(bf16, cpu)[0] == pytest.approx(0.01)
    # 1 -> 2 threads: the product doubles, the convolution gains 1.5x; a compute-bound
    # convolution call scales by the convolution's gain, not the product's
    two = replace(device(200e9, 1e15), conv_flops={"fp32": 37.5e9})
    measured = [replace(conv, seconds=0.040)]
    est = scale_step(measured, cpu, [conv], two, overhead_s=0.0, call_latency_s=0.0)
    assert est.step_s == pytest.approx(0.040 / 1.5)
    # ranks side by side share the convolution rate like the peaks
    whole = replace(device(180e9, 1e15), conv_flops={"fp32": 30e9})
    assert shared_by(cpu, whole, 2).conv_flops == pytest.approx({"fp32": 15e9})


def test_conv_rate_counts_forward_and_both_gradients(monkeypatch):
    import lungbench.measure.peak as peak
    from lungbench.measure.peak import CONV_SHAPE, conv_rate

    rate = conv_rate(torch.device("cpu"), "fp32", repeats=1)
    s = CONV_SHAPE
    flops = 6 * s["batch"] * s["out_channels"] * s["side"] ** 3 * s["in_channels"] * 27
    counter = FlopCounterMode(display=False)
    x = torch.randn(s["batch"], s["in_channels"], *(s["side"],) * 3, requires_grad=True)
    conv = torch.nn.Conv3d(s["in_channels"], s["out_channels"], 3, padding=1, bias=False)
    with counter:
        conv(x).sum().backward()
    assert counter.get_total_flops() == flops  # the count conv_rate divides by
    assert 1e8 < rate < 1e14

    # conv_rate divides that count by its best timed run
    monkeypatch.setattr(peak, "timed_runs", lambda run, device, repeats: [0.5, 0.25, 0.4])
    assert peak.conv_rate(torch.device("cpu"), "fp32") == pytest.approx(flops / 0.25)


def test_bandwidth_curve_read_log_linearly_and_clamped():
    from dataclasses import replace

    curved = replace(device(1e9, 10e9), bandwidth_curve=((1e6, 100e9), (1e8, 40e9)))
    assert curved.bandwidth_for(1e6) == pytest.approx(100e9)
    assert curved.bandwidth_for(1e7) == pytest.approx(70e9)  # halfway in log size
    assert curved.bandwidth_for(1e3) == pytest.approx(100e9)  # below: the cache's
    assert curved.bandwidth_for(1e10) == pytest.approx(40e9)  # beyond: DRAM's
    assert device(1e9, 10e9).bandwidth_for(1e7) == 10e9  # no curve: the profile's
    call = OpCall("aten::add", flops=0, bytes=10_000_000, dtype="fp32")
    assert roof_s(call, curved)[1] == pytest.approx(1e7 / 70e9)


def test_ddp_overhead_of_a_record_by_hand():
    record = {
        "step_s_median": 0.020,
        "allreduce_model_s": 0.001,
        "ranks": [{"compute_s_median": 0.014}, {"compute_s_median": 0.015}],
    }
    assert overhead_of(record) == pytest.approx(0.004)  # 20 - max(14, 15) - 1 ms
    no_fit = {**record, "allreduce_model_s": None, "allreduce_s_median": 0.002}
    assert overhead_of(no_fit) == pytest.approx(0.003)
    # below 0 stays below 0: a measurement problem the prediction says in words
    assert overhead_of({**record, "step_s_median": 0.010}) == pytest.approx(-0.006)


def test_alpha_beta_fit_on_synthetic_points():
    alpha, beta = 50e-6, 2e9
    sizes = [1e3, 1e5, 1e6, 1e7]
    times = [AlphaBeta(alpha, beta).allreduce_s(n, 2) for n in sizes]
    fit = fit_alpha_beta(sizes, times, 2)
    assert fit.alpha_s == pytest.approx(alpha)
    assert fit.beta_bytes_per_s == pytest.approx(beta)


def test_buckets_cover_every_gradient():
    model = TINY.build_model(torch.device("cpu"))
    assert sum(bucket_bytes(model)) == 4 * sum(p.numel() for p in model.parameters())


# ---- device profiles -----------------------------------------------------------------------


EXPECTED = {"v100-sxm2", "a100-sxm-40gb", "a100-sxm-80gb", "h100-sxm", "h200", "l40s", "cpu"}


def test_every_shipped_profile_parses_and_names_its_sources():
    profiles = shipped_profiles()
    assert set(profiles) >= EXPECTED
    for profile in profiles.values():
        assert profile.sources and all(s.strip() for s in profile.sources.values())
    sheets = [p for p in profiles.values() if not p.measured]
    assert len(sheets) >= len(EXPECTED) - 1, "every shipped GPU profile is from a data sheet"
    for profile in sheets:
        assert profile.peak_flops["fp32"] > 0 and profile.memory_bandwidth > 0
        assert any("data sheet" in s for s in profile.sources.values())
    assert shipped_profiles()["v100-sxm2"].peak_flops["fp32"] == 15.7e12
    assert shipped_profiles()["a100-sxm-80gb"].memory_bandwidth == 2039e9


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(UsageError, match="known: .*v100-sxm2"):
        look_up_device("v1000", load_profiles())


def test_a_user_profile_and_a_malformed_one(tmp_path):
    good = tmp_path / "mine.toml"
    text = (Path(__file__).parents[1] / "lungbench/predict/devices/l40s.toml").read_text()
    good.write_text(text.replace('name = "l40s"', 'name = "mine"'))
    assert "mine" in load_profiles([str(good)])
    with pytest.raises(DataError, match="source"):
        parse_profile('name = "x"\nkind = "cuda"\n[peak_flops]\nfp32 = { value = 1 }\n', "x.toml")


@pytest.mark.parametrize("value", ["nan", "-74.5e9", "inf"])
def test_a_measured_profile_takes_0_as_a_placeholder_but_no_impossible_number(value):
    """The CPU's profile is measured when used, its 0s are placeholders; a NaN or a negative
    number written into one is still refused (it would be silently replaced)."""
    text = (Path(__file__).parents[1] / "lungbench/predict/devices/cpu.toml").read_text()
    assert parse_profile(text, "cpu.toml").measured
    bad = text.replace("fp32 = { value = 0,", f"fp32 = {{ value = {value},", 1)
    assert bad != text
    with pytest.raises(DataError, match=r"\[peak_flops\] fp32 = .*must be a finite number"):
        parse_profile(bad, "mine.toml")


def test_a_device_file_that_says_measured_is_refused(tmp_path):
    """`measured = true` stands for this machine's CPU: a user's file with it would be
    replaced by this machine's numbers without a word."""
    text = (Path(__file__).parents[1] / "lungbench/predict/devices/cpu.toml").read_text()
    mine = tmp_path / "othercpu.toml"
    mine.write_text(text.replace('name = "cpu"', 'name = "othercpu"'))
    with pytest.raises(DataError, match="measured = true means"):
        load_profiles([str(mine)])


# ---- the command -----------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """`lungbench predict ...` as the CLI runs it (errors: one line, exit 2), with only this
    command registered, so the test does not depend on the other commands' modules."""
    parser = OneLineParser(prog="lungbench")
    predict_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, DataError) as exc:
        print(f"lungbench predict: error: {exc}", file=sys.stderr)
        return exc.exit_code


def test_run_folder_without_records_says_what_to_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["predict", "--from", str(tmp_path / "run"), "--batch", "4"]) == 2
    assert "run `lungbench bench" in capsys.readouterr().err


def test_record_without_flops_says_what_to_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    record = {"key": "k", "status": "ok", "world_size": 1, "step_s_median": 0.1, "model": "m"}
    (run / "records.jsonl").write_text(json.dumps(record) + "\n")
    assert main(["predict", "--from", str(run), "--batch", "4"]) == 2
    err = capsys.readouterr().err
    assert "flops_per_step" in err and "lungbench bench" in err and len(err.splitlines()) == 1


def test_unknown_device_on_the_command_line(tmp_path, capsys):
    assert main(["predict", "--from", str(tmp_path), "--device", "tpu"]) == 2
    assert "known:" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)  # 4.5 min on the shared 2-core VM under load
def test_validate_quick_end_to_end(tmp_path, monkeypatch, capsys):
    from lungbench.measure.timing import StopRule
    from lungbench.predict import rank_share

    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path))
    # A precision no noisy measurement reaches: the workers go on to the last round (the
    # rule as it is when the parent calls them, not as they import it).
    monkeypatch.setattr(rank_share, "RULE", StopRule(ci_target=0.0, max_repeats=13))
    assert main(["predict", "--validate", "--quick", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    kinds = {c["kind"] for c in out["cases"]}
    assert {"source", "batch", "filters", "threads", "ranks", "epoch"} <= kinds
    assert all(c["predicted_s"] > 0 for c in out["cases"] if c["kind"] != "source")
    assert out["summary"]["median_abs_error"] is not None
    assert out["summary"]["sources"] == 2  # the quick rotation: tuned and eager-fp32
    assert (tmp_path / "predict_validation.json").is_file()
    scored = [c for c in out["cases"] if c.get("error") is not None]
    assert scored, "some cases were measured and scored"
    for c in scored:
        assert c["error"] == pytest.approx(c["predicted_s"] / c["measured_s"] - 1)
    # the ranks side by side ran with the allocator every lungbench process has
    ranks = json.loads((tmp_path / "rank_contention.json").read_text())["entries"]
    assert ranks and all("freed memory kept" in e["allocator"] for e in ranks.values())
    assert all((e["rounds"], e["stop"]) == (13, "max") for e in ranks.values())
    assert all(e["ratio_ci"] > 0 for e in ranks.values())


def plant_profile_run(run: Path) -> None:
    """A `lungbench profile` run folder of the tiny workload, measured on this host."""
    import socket

    run.mkdir()
    workload = {"model": "dualpath3d", "preset": "dey2018", "filters": 2, "batch_size": 2,
                "device": "cpu", "threads": 1, "seed": 0}  # fmt: skip
    (run / "config.json").write_text(json.dumps({"profile": {"workload": workload}}))
    profile = {"step_ms": 50.0, "flops_per_step": 1e7, "device": "cpu", "world_size": 1,
               "threads_used": 1, "dtype_used": "fp32", "optimizer_used": "foreach"}  # fmt: skip
    (run / "profile.json").write_text(json.dumps(profile))
    (run / "environment.json").write_text(json.dumps({"host": socket.gethostname()}))


@pytest.mark.slow  # the fast tier starts no process and trains nothing
def test_a_profile_run_is_a_source_and_its_probe_is_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "profile-run"
    plant_profile_run(run)
    argv = ["predict", "--from", str(run), "--batch", "4", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["status"] == "ok" and first["batch"] == 4 and first["step_s"] > 0
    assert any("without the profiler" in note for note in first["notes"])
    assert (tmp_path / "cache" / "operator_probe.json").is_file()
    # the convolutions at batch 4 were made alone beside the source's (kernels)
    ratios = json.loads((tmp_path / "cache" / "kernel_ratios.json").read_text())["entries"]
    assert ratios and all(r is None or r > 0 for r in ratios.values())
    assert main(argv) == 0  # the same question, the same answer: the probe comes from the cache
    assert json.loads(capsys.readouterr().out)["step_s"] == first["step_s"]


def test_a_profile_of_several_ranks_is_refused(tmp_path, capsys):
    run = tmp_path / "profile-run"
    plant_profile_run(run)
    profile = json.loads((run / "profile.json").read_text())
    (run / "profile.json").write_text(json.dumps({**profile, "world_size": 2}))
    assert main(["predict", "--from", str(run), "--batch", "4"]) == 2
    assert "1-process run" in capsys.readouterr().err


def test_projected_m100_rows_in_the_speedup_layout_beside_the_thesis():
    import pandas as pd

    from lungbench.predict.thesis import TABLE, projected_table
    from lungbench.report.reference import default_reference_dir, load_references

    rows = [
        {"platform": p, "filters": f, "epoch_s": e, "status": "ok"}
        for p, f, e in [
            ("M100 (1 GPU)", 8, 2.0), ("M100 (1 GPU)", 16, 4.0),
            ("M100 (4 GPUs)", 8, 0.5), ("M100 (4 GPUs)", 16, 1.0),
        ]
    ]  # fmt: skip
    measured = pd.DataFrame(
        {
            "Batch size = 2": ["cpu (2 threads)"],
            "Filters = 8 | Exec. time (s)": [6.0],
            "Filters = 16 | Exec. time (s)": [10.0],
        }  # fmt: skip
    )
    table = projected_table(rows, measured)
    assert list(table["Batch size = 2"]) == [
        "M100 (1 GPU) (projected)",
        "M100 (4 GPUs) (projected)",
    ]
    assert list(table["Filters = 8 | Speed-up"]) == [3.0, 12.0]  # 6 s / 2 s, 6 s / 0.5 s
    assert list(table["Filters = 16 | Exec. time (s)"]) == [4.0, 1.0]
    no_cpu = projected_table(rows, None)
    assert no_cpu["Filters = 8 | Speed-up"].isna().all()
    references = load_references(default_reference_dir())
    beside = references.beside(TABLE).references
    assert [r.path.name for r in beside] == ["seed000_speedup_b2.csv"]


def test_channels_off_the_simd_block_are_named(monkeypatch):
    from lungbench.predict import forecast

    monkeypatch.setattr(forecast, "channel_block", lambda: 16)
    assert forecast.channel_notes(Workload(preset="default", filters=16, batch_size=2)) == []
    (note,) = forecast.channel_notes(Workload(preset="default", filters=12, batch_size=2))
    assert "channels 12, 24 are not multiples of 16" in note  # 48 and 96 are; 1 is the image


def test_validations_of_an_earlier_model_are_not_pooled(tmp_path, monkeypatch):
    from lungbench.predict import calibration

    # the shipped intervals come from validations of this model, every kind of them; a
    # model-3 run's cases (ranks without their DDP step) describe none of its kinds
    shipped = calibration.shipped_cases()
    kept = calibration.pooled(shipped["cases"], shipped["model"])
    assert {c["kind"] for c in kept} == {"batch", "filters", "threads", "ranks", "epoch"}
    assert shipped["model"] == calibration.MODEL_VERSION
    assert calibration.pooled(shipped["cases"], 3) == []
    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path))
    case = {"kind": "batch", "predicted_s": 1.0, "measured_s": 1.5}
    monkeypatch.setattr(calibration, "FIRST_MODEL", {"*": 1})
    monkeypatch.setattr(calibration, "MODEL_VERSION", 1)
    calibration.save_cases([case], "then")
    assert calibration.load_cases()[0] == [case]
    monkeypatch.setattr(calibration, "MODEL_VERSION", 2)  # the model changed since
    monkeypatch.setattr(calibration, "FIRST_MODEL", {"*": 2})
    monkeypatch.setattr(calibration, "shipped_cases", lambda: {"model": 1, "cases": [case]})
    cases, where = calibration.load_cases()
    assert cases == [] and "no validation run of this model version" in where
    fresh = {"kind": "batch", "predicted_s": 1.0, "measured_s": 1.02}
    calibration.save_cases([fresh], "now")
    assert calibration.load_cases()[0] == [fresh]  # the earlier model's run is dropped


def test_intervals_from_signed_validation_errors_by_hand():
    import math

    from lungbench.predict import calibration

    # filters: measured 10% and 25% above two predictions (the model predicts low), and
    # once 5% below; threads: once exactly right
    cases = [
        {"kind": "filters", "predicted_s": 1.0, "measured_s": 1.10, "error": 1 / 1.10 - 1},
        {"kind": "filters", "predicted_s": 1.0, "measured_s": 1.25, "error": 1 / 1.25 - 1},
        {"kind": "filters", "predicted_s": 2.0, "measured_s": 1.90, "error": 2 / 1.90 - 1},
        {"kind": "threads", "predicted_s": 1.0, "measured_s": 1.0, "error": 0.0},
    ]
    bounds = calibration.error_bounds(cases)
    # 3 cases: their whole range (ranks floor(4 x 0.05) -> 1 and ceil(4 x 0.95) = 4 -> 3),
    # widened to mean +- t(0.95, 2) s sqrt(4 / 3): 2.92 standard deviations each side
    logs = [math.log(1.10), math.log(1.25), math.log(0.95)]
    mean, sd = sum(logs) / 3, statistics.stdev(logs)
    half = 2.919986 * sd * math.sqrt(4 / 3)
    assert bounds["filters"] == pytest.approx((mean - half, mean + half), rel=1e-5)
    assert mean - half < math.log(0.95) and mean + half > math.log(1.25)
    assert bounds["threads"] == (0.0, 0.0)  # one case: its range
    low, high = bounds["filters"]
    # the interval reaches further up than down: the model is low on this kind
    lo, hi = calibration.interval(1.0, calibration.log_bounds(["filters"], bounds))
    assert (lo, hi) == pytest.approx((math.exp(low), math.exp(high)))
    assert hi - 1.0 > 1.0 - lo
    # two kinds: each end the root-sum-square of the kinds' ends (threads adds nothing)
    assert calibration.log_bounds(["filters", "threads"], bounds) == pytest.approx((low, high))
    assert calibration.log_bounds([], bounds) == (0.0, 0.0)  # the source itself
    assert calibration.log_bounds(["ranks"], bounds) is None  # never validated
    assert calibration.interval(1.0, None) is None
    # 39 cases: ranks floor(40 x 0.05) = 2 and ceil(40 x 0.95) = 38 where the t interval
    # is narrower: most cases together, two far out on each side
    logs = [0.0] * 35 + [-0.3, -0.2, 0.2, 0.3]
    many = [{"kind": "batch", "predicted_s": 1.0, "measured_s": math.exp(r)} for r in logs]
    assert calibration.error_bounds(many)["batch"] == pytest.approx((-0.2, 0.2))
    # ... and the t interval where it is wider: cases spread evenly
    even = [{"kind": "batch", "predicted_s": 1.0, "measured_s": 1 + k / 100} for k in range(39)]
    logs = [math.log(1 + k / 100) for k in range(39)]
    half = 1.686 * statistics.stdev(logs) * math.sqrt(1 + 1 / 39)  # t(0.95, 38) = 1.686
    centre = statistics.mean(logs)
    assert calibration.error_bounds(even)["batch"] == pytest.approx(
        (centre - half, centre + half), rel=1e-3
    )


def test_each_target_reads_the_probe_line_on_its_side():
    from lungbench.predict.operators import OperatorTable, second_probes

    probes = second_probes(Workload(preset="default", filters=8, batch_size=4), -1, -1)
    assert {k: (w.batch_size, w.filters) for k, w in probes.items()} == {
        "reference": (8, 8), "low": (2, 8), "smallest": (1, 8), "width": (4, 16),
    }  # fmt: skip
    assert "smallest" not in second_probes(TINY, -1, None)  # batch 2: its half is batch 1
    call = OpCall("aten.mm", 1.0, 1.0, "fp32")
    up, low, small, wide = ((replace(call, seconds=s),) for s in (1, 2, 3, 4))
    table = OperatorTable((call,), 0.0, 0.0, 0.0, up, wide, low, small)
    assert table.reference_for(2.0, False) is up
    assert table.reference_for(0.75, False) is low
    assert table.reference_for(0.25, False) is small
    assert table.reference_for(0.25, True) is wide  # a width change reads the width line


def test_a_slow_remeasure_cannot_lower_the_convolution_rate(monkeypatch, tmp_path):
    import lungbench.measure.peak as peak
    from lungbench.predict.devices import measure_conv_rates

    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path))  # this test's own cache
    rates = iter([100e9, 90e9, 40e9, 50e9, 40e9, 50e9])  # fp32 twice, then bf16 twice...
    monkeypatch.setattr(peak, "conv_rate", lambda device, dtype: next(rates))
    monkeypatch.setattr("lungbench.switches.bf16_supported", lambda device: False)
    plant_machine(monkeypatch, busy=[False, False])  # quiet both times, whatever the host
    assert measure_conv_rates(1) == {"fp32": 100e9}  # the best of two
    assert measure_conv_rates(1) == {"fp32": 100e9}  # cached
    assert measure_conv_rates(1, refresh=True) == {"fp32": 100e9}  # slower now: kept


def plant_machine(monkeypatch, busy: list[bool]) -> None:
    """Each ContentionWatch finds the machine busy or quiet, in this order."""
    from lungbench.measure.contention import ContentionWatch

    verdicts = iter(busy)

    def stop(self):
        b = next(verdicts)
        self.result = {"busy": b, "busy_reason": "planted load" if b else None}
        return self.result  # as the real stop: returned and kept (read as watch.result)

    monkeypatch.setattr(ContentionWatch, "stop", stop)


def test_a_busy_measurement_is_cached_marked_busy_until_a_quiet_one_replaces_it(
    monkeypatch, tmp_path
):
    import lungbench.measure.peak as peak
    from lungbench.predict.devices import busy_measurements, measure_conv_rates

    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("lungbench.switches.bf16_supported", lambda device: False)
    rates = iter([30e9, 20e9, 80e9, 70e9, 10e9, 10e9])
    monkeypatch.setattr(peak, "conv_rate", lambda device, dtype: next(rates))
    plant_machine(monkeypatch, busy=[True, False, True])
    assert measure_conv_rates(1) == {"fp32": 30e9}  # busy, nothing cached: kept, marked
    assert busy_measurements(1) == {"convolution rate": "planted load"}
    assert measure_conv_rates(1) == {"fp32": 30e9}  # the same answer, not measured again
    assert measure_conv_rates(1, refresh=True) == {"fp32": 80e9}  # quiet: replaces it
    assert busy_measurements(1) == {}
    assert measure_conv_rates(1, refresh=True) == {"fp32": 80e9}  # busy: the quiet one stays
    with pytest.raises(StopIteration):
        next(rates)  # every planted reading was used: no measurement was skipped


def test_every_prediction_says_which_of_its_numbers_were_measured_busy(monkeypatch, tmp_path):
    from lungbench.predict.forecast import BUSY_MARK, busy_notes, cpu_here

    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path))
    import lungbench.predict.forecast as forecast

    monkeypatch.setattr(forecast, "measure_cpu_peaks", lambda t, refresh: {"fp32": 1e11,
                        "copy_bytes_per_s": 1e10})  # fmt: skip
    monkeypatch.setattr(forecast, "measure_bandwidth_curve", lambda t, refresh: ((1e6, 1e10),))
    monkeypatch.setattr(forecast, "measure_conv_rates", lambda t, refresh: {"fp32": 5e10})
    monkeypatch.setattr(forecast, "busy_measurements", lambda t: {"peaks": "planted load"})
    device = cpu_here(1)
    assert device.sources["peaks"] == f"{BUSY_MARK} (planted load)"
    assert busy_notes(device, device) == [f"{device.name} peaks: {BUSY_MARK} (planted load)"]
    monkeypatch.setattr(forecast, "busy_measurements", lambda t: {})
    assert busy_notes(cpu_here(1)) == []


def test_gpu_models_map_to_their_shipped_profiles():
    from lungbench.predict.devices import shipped_profiles
    from lungbench.predict.validate_gpu import profile_for_gpu

    names = {
        "NVIDIA H200": "h200",
        "NVIDIA H100 80GB HBM3": "h100-sxm",
        "NVIDIA A100-SXM4-80GB": "a100-sxm-80gb",
        "NVIDIA A100-SXM4-40GB": "a100-sxm-40gb",
        "NVIDIA L40S": "l40s",
        "Tesla V100-SXM2-16GB": "v100-sxm2",
        "NVIDIA GeForce RTX 4090": None,
    }
    assert {n: profile_for_gpu(n) for n in names} == names
    assert {p for p in names.values() if p} <= set(shipped_profiles())


@pytest.mark.slow  # the fast tier starts no process and trains nothing
def test_gpu_validation_flow_on_the_cpu(tmp_path, monkeypatch):
    # The GPU validation's flow (bench the source and targets, predict from the source's
    # record, compare, store) with the CPU standing in for the GPU; no profile fits "cpu",
    # so CPU -> GPU is skipped with a note.
    from lungbench.predict.validate_gpu import GPU_QUICK, run_gpu_validation

    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path))
    cases = run_gpu_validation(
        replace(GPU_QUICK, source=replace(GPU_QUICK.source, device="cpu"), cpu_threads=1),
        bench_subprocess,
    )
    assert cases[0]["kind"] == "source"
    scored = {(c["kind"], c["target"]): c for c in cases[1:]}
    assert set(scored) == {("batch", "cpu f2 b3"), ("filters", "cpu f3 b2")}
    assert all(c["measured_s"] > 0 and c["predicted_s"] > 0 for c in scored.values())
    assert all(c["error"] == pytest.approx(c["predicted_s"] / c["measured_s"] - 1)
               for c in scored.values())  # fmt: skip
    assert (tmp_path / "predict_validation.json").is_file()


def test_gpu_flag_needs_validate_and_a_gpu(capsys, monkeypatch):
    assert main(["predict", "--gpu"]) == 2
    assert "--gpu goes with --validate" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU node too: planted
    assert main(["predict", "--validate", "--gpu"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


# ---- bad input, busy sources, measured targets, intervals of another host ------------------


def plant_bench_run(run: Path, complete: bool = True, **fields) -> dict:
    """A bench run folder of the tiny workload measured on another host (its peaks in
    environment.json: the roofline shares its step out; nothing is probed here)."""
    run.mkdir()
    record = {"key": "dey2018 f2 b2 t1", "status": "ok", "world_size": 1, "model": "dualpath3d",
              "preset": "dey2018", "filters": 2, "batch_size": 2, "device": "cpu",
              "threads_used": 1, "seed": 0, "step_s_median": 0.020, "flops_per_step": 1e8,
              "step_s_ci_low": 0.019, "step_s_ci_high": 0.022, **fields}  # fmt: skip
    (run / "records.jsonl").write_text(json.dumps(record) + "\n")
    peaks = {"cpu": {"fp32": 1e11, "copy_bytes_per_s": 2e10}}
    (run / "environment.json").write_text(json.dumps({"host": "elsewhere", "peak_flops": peaks}))
    (run / "run.json").write_text(json.dumps({"status": "complete" if complete else "running"}))
    return record


def predict_json(capsys, run: Path, *options: str) -> list[dict]:
    assert main(["predict", "--from", str(run), "--json", *options]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_a_field_that_is_not_a_number_is_named_in_one_line(tmp_path, capsys):
    plant_bench_run(tmp_path / "run", batch_size="two")
    assert main(["predict", "--from", str(tmp_path / "run"), "--batch", "4"]) != 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "records.jsonl" in err and "batch_size" in err and "'two'" in err


@pytest.mark.parametrize("option", [["--filters", "100000"], ["--batch", "100000000"]])
def test_a_target_no_memory_holds_is_one_row_not_a_traceback(tmp_path, monkeypatch, capsys, option):
    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path / "cache"))
    plant_bench_run(tmp_path / "run")
    (pred,) = predict_json(capsys, tmp_path / "run", *option)
    assert pred["status"] == "oom" and pred["step_s"] is None
    assert any(n.startswith("does not fit") and "GiB" in n for n in pred["notes"])
    assert main(["predict", "--from", str(tmp_path / "run"), *option]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "does not fit" in line]
    assert len(rows) == 1


def test_a_busy_source_warns_and_widens_its_interval(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path / "cache"))
    plant_bench_run(tmp_path / "quiet")
    plant_bench_run(tmp_path / "busy", busy=True, busy_reason="other processes kept 1.2 cores")
    (quiet,) = predict_json(capsys, tmp_path / "quiet", "--batch", "3")
    (busy,) = predict_json(capsys, tmp_path / "busy", "--batch", "3")
    assert busy["step_s"] == pytest.approx(quiet["step_s"])
    assert not any("busy" in n for n in quiet["notes"])
    assert any(n.startswith("warning:") and "1.2 cores" in n for n in busy["notes"])
    assert busy["interval"][0] < quiet["interval"][0] and busy["interval"][1] > quiet["interval"][1]
    assert "busy source" in busy["interval_basis"]


def test_a_target_the_run_measured_is_returned_as_measured(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path / "cache"))
    plant_bench_run(tmp_path / "run")
    (pred,) = predict_json(capsys, tmp_path / "run", "--batch", "2")
    assert pred["status"] == "measured" and pred["step_s"] == 0.020
    assert pred["interval"] == [0.019, 0.022]  # the record's own, not zero width
    assert "measured" in pred["interval_basis"] and "measured, not predicted" in pred["notes"][0]


def test_a_partial_run_and_failed_configurations_are_warned_about(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    plant_bench_run(run, complete=False)
    failed = {"key": "dey2018 f2 b64 t1", "status": "oom", "world_size": 1}
    with (run / "records.jsonl").open("a") as f:
        f.write(json.dumps(failed) + "\n")
    (pred,) = predict_json(capsys, run, "--batch", "3")
    assert any("partial" in n and "running" in n for n in pred["notes"])
    assert any("failed" in n and "f2 b64" in n for n in pred["notes"])


def test_an_interval_of_another_host_says_so_and_is_wider(tmp_path, monkeypatch):
    import math

    from lungbench.predict import calibration

    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path))
    # two shipped hosts whose batch predictions were 10% low and 10% high at the median
    cases = [
        {"kind": "batch", "predicted_s": 1.0, "measured_s": m, "host": h}
        for h, ms in (("a", (1.1, 1.1, 1.12)), ("b", (0.9, 0.9, 0.88)))
        for m in ms
    ]
    monkeypatch.setattr(
        calibration,
        "shipped_cases",
        lambda: {"model": calibration.MODEL_VERSION, "host": "a and b", "cases": cases},
    )
    shipped = calibration.for_this_host()
    assert not shipped.own_host and "NOT this host" in shipped.source
    assert shipped.widen == pytest.approx(math.log(1.1) - math.log(0.9))
    calibration.save_cases(cases[:3], "now")  # this host validated: its own, not widened
    own = calibration.for_this_host()
    assert own.own_host and own.widen == 0.0 and "this host's last 1" in own.source


# ---- the rotated validation's flow, on planted timings -------------------------------------


def planted_step_s(w: Workload) -> float:
    """A planted 'measured' step: proportional to batch and width, halved per thread."""
    return 0.001 * w.batch_size * w.filters / (w.threads or 1)


DDP_STEP_S = {"weak": 0.05, "strong": 0.03}
EPOCH_S = {(2, 2): 1.0, (3, 2): 1.5}


def test_rotated_validation_reports_the_errors_of_the_values_it_wrote(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lungbench.predict import validate
    from lungbench.predict.forecast import Prediction

    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path))
    bias = {"tuned": -0.05, "eager-fp32": 0.10}  # each source's model error, planted

    class PlantedPredictor:
        def __init__(self, remeasure=False, launch=None):
            self.launch = launch

        def predict(self, source, target):
            w = validate.target_workload(source.workload, target)
            if target.ranks > 1:
                truth = DDP_STEP_S[target.scaling]
            elif target.epoch_samples:
                truth = EPOCH_S[(w.batch_size, w.filters)]
            else:
                truth = planted_step_s(w)
            guess = truth * (1 + bias[source.key.rsplit(" ", 1)[-1]])
            return Prediction(source.key, "cpu", w.batch_size, w.batch_size * target.ranks,
                              w.filters, w.threads, target.ranks, target.scaling, step_s=guess,
                              epoch_s=guess, bound="compute", interval=(guess, guess))  # fmt: skip

    def planted_source(key, workload, switches, step, fresh=False):
        return SimpleNamespace(key=key, workload=workload)

    def launch(bench_args, ranks, out):  # the epoch bench of the tuned source
        records = [{"batch_size": b, "filters": f, "epoch_s": s} for (b, f), s in EPOCH_S.items()]
        return records, {}

    measured_pairs = []

    def planted_pair(source, target, plan):
        measured_pairs.append((source, target))
        return planted_step_s(source), planted_step_s(target)

    monkeypatch.setattr(validate, "Predictor", PlantedPredictor)
    monkeypatch.setattr(validate, "source_here", planted_source)
    monkeypatch.setattr(validate, "measure_step_s", lambda w, plan: planted_step_s(w))
    monkeypatch.setattr(validate, "measure_pair", planted_pair)
    monkeypatch.setattr(
        validate,
        "run_ddp_bench",
        lambda run, launch, out: [
            {"scaling": k, "step_s_median": v} for k, v in DDP_STEP_S.items()
        ],
    )
    monkeypatch.setattr(
        validate,
        "source_from_record",
        lambda r, env, where: SimpleNamespace(
            key=validate.QUICK.name(), workload=validate.QUICK.source
        ),
    )
    cases = validate.run_rotation(validate.QUICK_ROTATION, launch)

    heads = [c for c in cases if c["kind"] == "source"]
    assert [c["target"] for c in heads] == [p.name() for p in validate.QUICK_ROTATION]
    scored = [c for c in cases if c["kind"] != "source"]
    # every error is predicted / measured - 1 of the values written beside it
    for c in scored:
        assert c["error"] == pytest.approx(c["predicted_s"] / c["measured_s"] - 1)
        assert c["error"] == pytest.approx(bias[c["source"].rsplit(" ", 1)[-1]])
    kinds = {(c["source"].rsplit(" ", 1)[-1], c["kind"]) for c in scored}
    assert kinds == {("tuned", k) for k in ("batch", "filters", "threads", "ranks", "epoch")} | {
        ("eager-fp32", k) for k in ("batch", "filters", "threads")
    }
    # no target is the source or one of its probe's points
    for plan in validate.QUICK_ROTATION:
        batches, widths = plan.probe_points()
        for _kind, target in plan.targets():
            assert target.batch not in batches and target.filters not in widths
    assert len(measured_pairs) == sum(
        1 for c in scored if c["kind"] in ("batch", "filters", "threads")
    )
    s = validate.summary(cases)
    assert s["median_abs_error_by_source"] == pytest.approx(
        {p.name(): abs(bias[p.switches]) for p in validate.QUICK_ROTATION}
    )
    assert s["median_abs_error_by_kind"]["ranks"] == pytest.approx(0.05)
    # each source's errors lie on the other side of 1 from the other's: no interval the
    # other source makes covers them
    assert s["coverage_leave_one_source_out"] == 0.0
    assert s["sources"] == 2
    stored = json.loads((tmp_path / "predict_validation.json").read_text())["entries"]
    assert sum(len(r["cases"]) for h in stored.values() for r in h["runs"]) == len(scored)
    text = predict_command.format_validation(cases)
    assert "by source:" in text and "leave-one-source-out: 0%" in text


def test_leave_one_source_out_coverage_by_hand():
    from lungbench.predict.validate import leave_one_source_out

    def c(source, measured):
        return {"source": source, "kind": "batch", "predicted_s": 1.0, "measured_s": measured}

    # a: +10%, b: +5%, c: -20%. a against b and c's range [0.8, 1.05]: out; b against
    # [0.8, 1.1]: in; c against [1.0 (never below the prediction's own end), 1.1]: out
    cases = [c("a", 1.10), c("b", 1.05), c("c", 0.80)]
    assert sorted(leave_one_source_out(cases)) == [False, False, True]


# ---- fast when warm: the second predict on a host measures nothing ---------------------------


def plant_measurements(monkeypatch, busy: bool, ddp_s: float):
    """Every measurement predict makes, planted and counted: (calls made so far). The ranks
    side by side: 10 ms alone, 12 ms their compute together, `ddp_s` their DDP step."""
    from collections import Counter

    from lungbench.measure import peak, peak_cache
    from lungbench.measure.contention import ContentionWatch
    from lungbench.predict import comm, ddp_probe, forecast, kernels, rank_share

    verdict = {"busy": busy, "busy_reason": "planted load" if busy else None}
    monkeypatch.setattr(ContentionWatch, "stop", lambda self: verdict)
    calls: Counter = Counter()

    def counted(name, result):
        def measure(*args, **kwargs):
            calls[name] += 1
            return result(*args, **kwargs) if callable(result) else result

        return measure

    real_probe = forecast.probe_operators
    monkeypatch.setattr(forecast, "probe_operators", counted("probe", real_probe))
    peaks = {"fp32": 1e11, "bf16": 2e11, "copy_bytes_per_s": 2e10}
    monkeypatch.setattr(peak_cache, "device_peaks", counted("peaks", peaks))
    monkeypatch.setattr(peak, "copy_bandwidth", counted("bandwidth", 2e10))
    monkeypatch.setattr(peak, "conv_rate", counted("conv rate", 5e10))
    monkeypatch.setattr(kernels.KernelRatios, "_measure", counted("kernels", 1.5))
    monkeypatch.setattr(
        comm, "measure_gloo",
        counted("gloo", lambda e, r: ([4 * n for n in e], [1e-4 + 4 * n / 1e9 for n in e])),
    )  # fmt: skip
    ddp = [{"world_size": 2, "step_s_median": 0.02, "allreduce_model_s": 0.001,
            "ranks": [{"compute_s_median": 0.015}]}]  # fmt: skip
    monkeypatch.setattr(ddp_probe, "run_ddp_bench", counted("ddp", ddp))
    times = rank_share.RankTimes(0.010, 0.012, ddp_s, 1.2, (ddp_s - 0.012) / 0.010)
    monkeypatch.setattr(rank_share, "side_by_side", counted("ranks", times))
    return calls


@pytest.mark.parametrize("busy", [False, True], ids=["quiet", "busy"])
def test_a_second_predict_on_the_host_measures_nothing(tmp_path, monkeypatch, capsys, busy):
    """On a quiet and on a busy machine (planted: every ContentionWatch's verdict), the same
    question gets the same answer, every figure from this host's cache."""
    from collections import Counter

    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path / "cache"))
    calls = plant_measurements(monkeypatch, busy, ddp_s=0.016)
    run = tmp_path / "profile-run"
    plant_profile_run(run)
    argv = ["predict", "--from", str(run), "--batch", "4", "--ranks", "1", "2", "--json"]
    assert main(argv) == 0
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"probe", "peaks", "ranks"} <= set(calls)
    # the DDP step was measured side by side: no all-reduce model, no tiny-model probe
    assert not {"gloo", "ddp"} & set(calls)
    calls.clear()
    assert main(argv) == 0
    assert calls == Counter()  # nothing measured again: every figure from this host's cache
    second = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["step_s"] for p in second] == [p["step_s"] for p in first]
    said_busy = [any("measured while busy" in n for n in p["notes"]) for p in second]
    assert said_busy == [busy] * len(second), "each answer says which numbers it used"
    two_ranks = second[1]
    assert any("1.20x its time alone" in n and "2 processes" in n for n in two_ranks["notes"])
    # step = alone x (12 / 10) + alone x (16 - 12) / 10: communication is 0.4 / 1.6 of it
    parts = two_ranks["parts_s"]
    assert parts["communication"] == pytest.approx(0.25 * two_ranks["step_s"])
    assert any(
        f"communication: {1e3 * parts['communication']:.1f} ms per step" in n
        and "2 processes side by side" in n
        for n in two_ranks["notes"]
    )


@pytest.mark.parametrize(
    ("precision", "warned"),
    [((48, 0.15, "max"), True), ((20, 0.04, "ci"), False), ((60, 0.12, "budget"), True)],
)
def test_how_well_the_rank_ratio_is_known_is_said(tmp_path, monkeypatch, capsys, precision, warned):
    """The ranks side by side say over how many rounds and to what precision they were
    measured; one known less well than the shipped validation's (+-10%) is a warning."""
    from lungbench.predict import rank_share

    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path / "cache"))
    plant_measurements(monkeypatch, busy=False, ddp_s=0.016)
    rounds, ci, stop = precision
    times = rank_share.RankTimes(0.010, 0.012, 0.016, 1.2, 0.4, "", rounds, ci, stop)
    monkeypatch.setattr(rank_share, "side_by_side", lambda *args: times)
    run = tmp_path / "profile-run"
    plant_profile_run(run)
    assert main(["predict", "--from", str(run), "--ranks", "2", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out.splitlines()[-1])["notes"]
    assert any(
        "1.20x its time alone" in n and f"over {rounds} rounds, +-{100 * ci:.1f}% at 95%" in n
        for n in notes
    )
    warning = [n for n in notes if n.startswith("warning:") and "known only to" in n]
    assert bool(warning) == warned
    if warned:
        assert f"+-{100 * ci:.0f}% after {rounds} rounds" in warning[0]


def test_a_ddp_step_no_slower_than_its_compute_falls_back_to_the_model(
    tmp_path, monkeypatch, capsys
):
    """Side by side, a DDP step that came out faster than the ranks' compute is a measurement
    problem: said, and the all-reduce model plus the per-host DDP probe used instead."""
    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path / "cache"))
    calls = plant_measurements(monkeypatch, busy=False, ddp_s=0.011)
    run = tmp_path / "profile-run"
    plant_profile_run(run)
    assert main(["predict", "--from", str(run), "--ranks", "2", "--json"]) == 0
    two_ranks = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert {"gloo", "ddp"} <= set(calls)
    notes = two_ranks["notes"]
    assert any("no slower than their compute (-1.00 ms), a measurement problem" in n for n in notes)
    assert any("+ 4.0 ms per step" in n for n in notes)  # the probe's: 20 - 15 - 1 ms


def test_a_ddp_loss_of_zero_or_less_is_a_measurement_problem_in_words():
    from lungbench.predict.forecast import ddp_overhead_note

    assert "0.0 ms" not in ddp_overhead_note(0.0)
    assert "measurement problem" in ddp_overhead_note(-0.002)
    assert "-2.00 ms" in ddp_overhead_note(-0.002)
    assert "not measured" in ddp_overhead_note(None)
    assert "3.5 ms per step" in ddp_overhead_note(0.0035)


def test_the_m100_projection_says_in_one_line_why_it_differs():
    from lungbench.predict.thesis import difference_line

    def rows(epochs):
        return [
            {"platform": p, "filters": f, "ranks": r, "epoch_s": e, "step_s": 0.01,
             "status": "ok", "parts_s": {"compute": 0.01}}
            for (p, r, f), e in epochs.items()
        ]  # fmt: skip

    one, four = "M100 (1 GPU)", "M100 (4 GPUs)"
    projected = {(one, 1, 8): 10.0, (one, 1, 16): 20.0, (four, 4, 8): 3.0, (four, 4, 16): 6.0}
    # 302 steps with 1 GPU, 76 with 4 (batch 2, 603 samples)
    grows = {(one, 8): 10.0 + 3.02, (one, 16): 20.0 + 9.06, (four, 8): 3.76, (four, 16): 7.5}
    line = difference_line(rows(projected), grows)
    assert line.startswith("why it differs: framework") and "10.0 ms per step at f8" in line
    shared = {(one, 8): 40.0, (one, 16): 50.0, (four, 8): 33.0, (four, 16): 36.0}
    assert "the data pipeline" in difference_line(rows(projected), shared)
    fixed = {(one, 8): 10.0 + 3.02, (one, 16): 20.0 + 3.02, (four, 8): 3.76, (four, 16): 6.76}
    line = difference_line(rows(projected), fixed)
    assert "per-step overhead" in line and "10.0 ms per step" in line
    assert len(line.splitlines()) == 1
    assert "no published row" in difference_line(rows(projected), {})


def test_busy_validation_cases_are_counted_and_left_out_of_the_quiet_median():
    from lungbench.predict.validate import summary

    cases = [
        {"source": "a", "kind": "batch", "predicted_s": 1.0, "measured_s": 1.0, "error": 0.02},
        {"source": "a", "kind": "batch", "predicted_s": 1.0, "measured_s": 1.0, "error": 0.04},
        {"source": "a", "kind": "threads", "predicted_s": 1.0, "measured_s": 1.0,
         "error": -0.9, "busy": "other processes kept 1.5 of 2 cores busy"},
    ]  # fmt: skip
    s = summary(cases)
    assert s["busy_cases"] == 1 and s["median_abs_error_quiet"] == pytest.approx(0.03)
    text = "\n".join(predict_command.summary_lines(cases))
    assert "1 of 3 cases were measured while the machine was busy" in text and "3.0%" in text


def test_list_devices_through_the_cli_names_every_shipped_profile(capsys):
    assert main(["predict", "--list-devices"]) == 0
    listed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert set(listed) == set(shipped_profiles())
    assert "15.7 TFLOP/s" in listed["v100-sxm2"] and "measured" in listed["cpu"]


@pytest.mark.slow  # a few seconds of roofline per question
def test_predict_through_the_cli_a_bench_run_to_gpu_ranks_and_the_thesis(
    tmp_path, monkeypatch, capsys
):
    """A bench-run source (measured elsewhere) projected to a GPU profile at 1 and 2 ranks,
    then seed 000's M100 rows (--thesis) from the same run."""
    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    plant_bench_run(run)
    one, two = predict_json(capsys, run, "--device", "v100-sxm2", "--ranks", "1", "2")
    assert (one["device"], one["ranks"], two["ranks"]) == ("v100-sxm2", 1, 2)
    assert (one["global_batch"], two["global_batch"]) == (2, 4)  # weak: the batch per rank
    assert "communication" not in one["parts_s"] and two["parts_s"]["communication"] > 0
    assert two["step_s"] > one["step_s"] and "ranks" in two["kinds"]
    assert "not validated" in two["interval_basis"]  # said, not hidden
    assert main(["predict", "--from", str(run), "--thesis"]) == 0
    out = capsys.readouterr().out
    assert "M100 (1 GPU) (projected)" in out and "M100 (4 GPUs) (projected)" in out
    projected = pd.read_csv(run / "tables" / "speedup_b2_projected.csv", index_col=0)
    assert len(projected) == 2


def test_epoch_outside_the_steps_is_bounded_by_the_measured_data_wait():
    from lungbench.predict.forecast import epoch_outside

    record = {"epoch_s": 1.0, "epoch_samples": 72, "epoch_split_samples": 603,
              "batch_size": 4, "step_s_median": 0.040}  # fmt: skip
    # 18 steps of 40 ms: 280 ms outside them
    assert epoch_outside(record) == (603, pytest.approx(0.280 / 72))
    # a data wait of 70 ms measured apart: the other 210 ms were slow steps, not data
    assert epoch_outside({**record, "epoch_data_wait_s": 0.070})[1] == pytest.approx(0.070 / 72)
    # a residual below the data wait is kept (the epoch's steps ran faster than the median)
    assert epoch_outside({**record, "epoch_data_wait_s": 0.5})[1] == pytest.approx(0.280 / 72)
    assert epoch_outside({**record, "epoch_s": 0.5})[1] == 0.0  # never below 0
    assert epoch_outside({"batch_size": 4, "step_s_median": 0.04}) == (603, None)


def test_rank_times_pair_each_round_and_wait_for_the_slowest_rank():
    from lungbench.predict.rank_share import rank_times

    # 2 rounds; the machine runs round 2 at half speed. Worker 0 alone: 10 ms, then 20 ms.
    alone = [[0.010, 0.011, 0.009], [0.020, 0.020, 0.021]]
    # together: each step the slower worker's time counts (12 ms, then 24 ms)
    together = [[[0.012, 0.010, 0.012], [0.024, 0.020, 0.024]],
                [[0.011, 0.012, 0.010], [0.022, 0.024, 0.020]]]  # fmt: skip
    ddp = [[[0.015] * 3, [0.030] * 3], [[0.014] * 3, [0.029] * 3]]
    times = rank_times(alone, together, ddp)
    assert times.factor == pytest.approx(1.2)  # each round 12/10 and 24/20
    assert times.communication == pytest.approx(0.3)  # (15 - 12) / 10 and (30 - 24) / 20
    assert times.alone_s == pytest.approx(0.015)  # the medians over rounds
    assert (times.rounds, times.ratio_ci) == (2, None)  # too few rounds for an interval


def test_the_rank_ratio_interval_is_the_median_interval_of_each_rounds_ratio():
    """12 rounds whose DDP step over the step alone reads 1.1, 1.2, ... (each round's
    slowest worker, step by step): the interval is the order-statistic one of those ratios,
    and the stop rule the workers share ends the rounds by it."""
    from lungbench.measure.stats import median_ci_relative
    from lungbench.measure.timing import StopRule, stop_reason
    from lungbench.predict.rank_share import rank_times

    ratios = [1.1 + 0.1 * (r % 4) for r in range(12)]
    alone = [[0.010] * 3 for _ in ratios]
    together = [[[0.011] * 3 for _ in ratios]] * 2
    slow = [[0.010 * q] * 3 for q in ratios]
    ddp = [slow, [[0.009 * q] * 3 for q in ratios]]  # worker 0 is the slower one
    times = rank_times(alone, together, ddp)
    assert times.rounds == 12
    assert times.ratio_ci == pytest.approx(median_ci_relative(ratios))
    assert stop_reason(ratios, 12, StopRule(ci_target=1.0), 0.0) == "ci"
    assert stop_reason(ratios, 13, StopRule(ci_target=1.0), 0.0) is None  # too few yet
    assert stop_reason(ratios, 12, StopRule(ci_target=0.0, max_repeats=12), 0.0) == "max"
    assert stop_reason(ratios, 12, StopRule(ci_target=0.0, budget_s=5.0), 6.0) == "budget"
    assert stop_reason(ratios, 12, StopRule(ci_target=0.0, budget_s=5.0), 1.0) is None


def test_a_probe_off_the_run_is_taken_again_once_and_said(tmp_path, monkeypatch):
    from lungbench.predict import forecast
    from lungbench.predict.operators import OperatorTable

    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path))
    probes = []

    def probe(workload, switches):  # a probe that always reads a 40 ms step
        probes.append(workload)
        call = OpCall("aten.mm", flops=1.0, bytes=1.0, dtype="fp32", seconds=0.03)
        return OperatorTable((call,), 0.040, 0.01, 1e-6)

    monkeypatch.setattr(forecast, "probe_operators", probe)
    monkeypatch.setattr(forecast, "cpu_here", lambda *args, **kwargs: "this cpu")
    plant_machine(monkeypatch, busy=[False] * 10)  # quiet, whatever the host's load
    w, switches = Workload(preset="dey2018", filters=2, batch_size=2, threads=1), Switches()
    source = forecast.source_here("run", w, switches, 0.020)
    assert len(probes) == 2  # probed, then again: its 40 ms step is 100% off the run's 20
    assert "100% off the run's (20.0 ms)" in source.busy  # still off: said, and widened
    assert forecast.source_here("run", w, switches, 0.020).busy == source.busy
    assert len(probes) == 2  # not again for the same run: a second predict stays fast
    assert forecast.source_here("run", w, switches, 0.038).busy is None  # within 15%
    assert len(probes) == 2


def test_ranks_that_could_not_be_timed_are_said_and_not_cached(tmp_path, monkeypatch, capsys):
    """A failed side-by-side measurement (a worker died, a port was taken): the prediction
    says so and falls back on the all-reduce model; nothing is cached, so the next predict
    measures again."""
    from lungbench.predict import rank_share

    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path / "cache"))
    calls = plant_measurements(monkeypatch, busy=False, ddp_s=0.016)

    def failed(*args, **kwargs):
        calls["ranks"] += 1
        raise RuntimeError("worker 1: address already in use")

    monkeypatch.setattr(rank_share, "side_by_side", failed)
    run = tmp_path / "profile-run"
    plant_profile_run(run)
    for attempt in (1, 2):
        assert main(["predict", "--from", str(run), "--ranks", "2", "--json"]) == 0
        notes = json.loads(capsys.readouterr().out.splitlines()[-1])["notes"]
        assert any("could not be timed" in n and "no contention assumed" in n for n in notes)
        assert any("+ 4.0 ms per step" in n for n in notes)  # the fallback: the probe's figure
        assert calls["ranks"] == attempt  # not cached: measured again
    assert not (tmp_path / "cache" / rank_share.CACHE_FILE).exists()


def test_ranks_measured_while_busy_are_measured_again_and_said(tmp_path, monkeypatch, capsys):
    """Other work on the cores while the processes run side by side (planted: the watch
    around that measurement reads busy, every other reads quiet): measured once more; still
    busy, the entry keeps why, and the prediction warns and widens its interval."""
    from lungbench.measure.contention import ContentionWatch
    from lungbench.predict import rank_share

    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path / "cache"))
    calls = plant_measurements(monkeypatch, busy=False, ddp_s=0.016)
    ranks_running = []
    planted_ranks = rank_share.side_by_side

    def side_by_side(*args, **kwargs):
        ranks_running.append(True)
        return planted_ranks(*args, **kwargs)

    def stop(self):
        busy = bool(ranks_running) and ranks_running.pop()
        self.result = {"busy": busy, "busy_reason": "planted load" if busy else None}
        return self.result

    monkeypatch.setattr(rank_share, "side_by_side", side_by_side)
    monkeypatch.setattr(ContentionWatch, "stop", stop)
    run = tmp_path / "profile-run"
    plant_profile_run(run)
    assert main(["predict", "--from", str(run), "--ranks", "2", "--json"]) == 0
    busy = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert calls["ranks"] == 2  # busy: measured once more
    (entry,) = json.loads((tmp_path / "cache" / rank_share.CACHE_FILE).read_text())[
        "entries"
    ].values()
    assert entry["busy_reason"] == "planted load"
    assert "2 processes side by side ran while busy (planted load)" in busy["busy"]
    assert any(
        n.startswith("warning:") and "side by side ran while busy" in n for n in busy["notes"]
    )
    # the same prediction from a quiet measurement: the same step, a narrower interval
    (tmp_path / "cache" / rank_share.CACHE_FILE).unlink()
    monkeypatch.setattr(rank_share, "side_by_side", planted_ranks)
    assert main(["predict", "--from", str(run), "--ranks", "2", "--json"]) == 0
    quiet = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert quiet["busy"] is None and quiet["step_s"] == pytest.approx(busy["step_s"])
    width = {p["busy"]: p["interval"][1] / p["interval"][0] for p in (busy, quiet)}
    assert width[busy["busy"]] > width[None]


def test_a_side_by_side_process_that_ends_without_answering_is_said_at_once():
    """A worker that could not start (a `python -` caller: spawn cannot re-import its main
    module) or was killed: the measurement fails with its exit code, not after waiting out
    the 600 s timeout at the others' barrier. The deadline here is an hour away, so only
    the dead-worker path can end the wait."""
    import multiprocessing as mp

    from lungbench.predict import rank_share

    context = mp.get_context("spawn")
    results = context.Queue()
    worker = context.Process(target=sys.exit, args=(3,))
    worker.start()
    with pytest.raises(RuntimeError, match=r"process 1 of 1 ended \(exit code 3\)"):
        rank_share._answers([worker], results, 3600)


def test_an_answer_sent_before_its_process_ended_is_kept():
    """The worker put its times and exited: its answer counts, the exit is no failure."""
    import multiprocessing as mp

    from lungbench.predict import rank_share

    context = mp.get_context("spawn")
    results = context.Queue()
    worker = context.Process(target=sys.exit, args=(0,))
    worker.start()
    worker.join()
    results.put((0, {"alone": []}))
    assert rank_share._answers([worker], results, 3600) == {0: {"alone": []}}
