"""Every measurement cache checks its entries one by one: a wrong type, a non-finite or a
negative number is dropped with a note, the file rewritten without it, and measured again;
the good entries beside it stay. The bad values are planted in each cache file in turn."""

from __future__ import annotations

import json
import logging
import math

import pytest

from lungbench.core.cache import VERSION, cache_dir, read_cache
from lungbench.experiments import reproduce
from lungbench.harness import tuning
from lungbench.measure import peak_cache
from lungbench.predict import calibration, comm, ddp_probe, devices, forecast, kernels, rank_share

CALL = {"name": "aten.mm", "flops": 1e6, "bytes": 1e3, "dtype": "fp32", "seconds": 1e-4}
PROBE = {"calls": [CALL], "step_s": 0.01, "overhead_s": 0.001, "call_latency_s": 1e-6,
         "busy_reason": None}  # fmt: skip
ROW = {"name": "eager_fp32", "pass": 1, "step_ms": 20.0, "speedup_vs_eager": 1.0,
       "accuracy_ok": True, "loss_delta": 0.0, "fell_back": None}  # fmt: skip
TUNED = {"choice": "eager_fp32", "switches": {"dtype": "fp32"}, "alternatives": [ROW]}
# cache file -> (a good entry, bad entries a careless hand or a torn write could leave)
CASES = {
    peak_cache.CACHE_FILE: (
        {"fp32": 1e11, "fp32_spread": 0.0, "copy_bytes_per_s": 1e10, "busy_reason": None},
        [
            {"fp32": "1e11"},
            {"fp32": None},
            {"fp32": math.nan},
            {"fp32": -1.0},
            {"fp32": True},
            {},
            "fast",
            None,
            {"fp32": 1e11, "busy_reason": 3},
        ],
    ),  # fmt: skip
    devices.CONV_FILE: ({"fp32": 5e10}, [{"fp32": "5e10"}, {"fp32": math.inf}, [], 7]),
    devices.CURVE_FILE: (
        {"262144.0": 2e10, "busy_reason": "planted load"},
        [{"262144.0": "fast"}, {"small": 2e10}, [[1, "x"]], [[1, 2, 3]], "curve"],
    ),
    kernels.CACHE_FILE: (2.5, ["2.5", -1.0, math.nan, {"ratio": 2}, False]),
    tuning.CACHE_FILE: (
        TUNED,
        [
            {**TUNED, "switches": {"dtype": "fp64"}},
            {**TUNED, "switches": {"speed": 1}},
            {**TUNED, "alternatives": [{**ROW, "step_ms": "20"}]},
            {**TUNED, "choice": 3},
            {**TUNED, "alternatives": [{**ROW, "accuracy_ok": "yes"}]},
            {"choice": "x"},
        ],
    ),  # fmt: skip
    comm.CACHE_FILE: (
        {"alpha_s": 1e-4, "beta_bytes_per_s": 1e9, "points": [[4096, 1e-4]]},
        [
            {"alpha_s": -1, "beta_bytes_per_s": 1e9},
            {"alpha_s": 0, "beta_bytes_per_s": "x"},
            {"alpha_s": 0, "beta_bytes_per_s": 1e9, "points": [[4096]]},
            {"alpha_s": None},
        ],
    ),  # fmt: skip
    ddp_probe.CACHE_FILE: (
        {"overhead_s": -0.002, "probe": "f2 b2"},
        [{"overhead_s": "0.002"}, {"overhead_s": math.nan}, {"probe": "f2 b2"}],
    ),
    rank_share.CACHE_FILE: (
        {
            "alone_s": 0.01,
            "together_s": 0.012,
            "ddp_s": 0.015,
            "factor": 1.2,
            "communication": 0.3,
            "took_s": 20.0,
            "rounds": 48,
            "ratio_ci": 0.075,
            "stop": "max",
        },
        [
            {
                "alone_s": 0.01,
                "together_s": 0.012,
                "ddp_s": 0.015,
                "factor": 1.2,
                "communication": 0.3,
                "ratio_ci": math.nan,  # how well the ratio is known: a number or None
            },
            {
                "alone_s": 0.01,
                "together_s": 0.012,
                "ddp_s": 0.015,
                "factor": 1.2,
                "communication": 0.3,
                "ratio_ci": 0.2,  # ... over a number of rounds
            },
            {
                "alone_s": 0.01,
                "together_s": 0.012,
                "ddp_s": 0.015,
                "factor": 1.2,
                "communication": 0.3,
                "stop": 3,
            },
            {
                "alone_s": 0.01,
                "together_s": "0.012",
                "ddp_s": 0.015,
                "factor": 1.2,
                "communication": 0.3,
            },
            {
                "alone_s": 0.01,
                "together_s": 0.012,
                "ddp_s": 0.015,
                "factor": -1.0,
                "communication": 0.3,
            },
            {
                "alone_s": 0.01,
                "together_s": 0.012,
                "ddp_s": None,
                "factor": 1.2,
                "communication": None,
            },
            {"alone_s": 0.01, "together_s": 0.012, "factor": 1.2},  # before the DDP step
            {"factor": 1.2},
        ],
    ),  # fmt: skip
    calibration.CACHE_FILE: (
        {
            "when": "x",
            "runs": [{"cases": [{"kind": "batch", "measured_s": 0.1, "predicted_s": 0.11}]}],
        },
        [
            {"runs": [{"cases": [{"kind": "batch", "measured_s": "0.1"}]}]},
            {"runs": [{"cases": [{"measured_s": 0.1}]}]},
            {"runs": "none"},
            {"when": "x"},
        ],
    ),  # fmt: skip
    reproduce.TIMES_CACHE: (
        {"wall_s": 12.5, "utc": "2026-12-06T22:00:00+00:00"},
        [{"wall_s": "12.5"}, {"wall_s": 0}, {"wall_s": math.inf}, {"utc": "x"}, 12.5],
    ),
    forecast.PROBE_CACHE: (
        PROBE,
        [
            {**PROBE, "step_s": "0.01"},
            {**PROBE, "calls": None},
            {**PROBE, "calls": [{}]},
            {**PROBE, "calls": [{**CALL, "flops": -1}]},
            {**PROBE, "calls": [{**CALL, "x": 1}]},
            {k: v for k, v in PROBE.items() if k != "step_s"},
            {**PROBE, "busy_reason": 1},
        ],
    ),  # fmt: skip
}


def plant(name: str, entries: dict) -> None:
    path = cache_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": VERSION, "entries": entries}))


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_entries_are_dropped_with_a_note_and_the_good_one_kept(
    name, monkeypatch, tmp_path, caplog
):
    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path))
    good, bad = CASES[name]
    plant(name, {"good": good, **{f"bad{i}": value for i, value in enumerate(bad)}})
    with caplog.at_level(logging.WARNING):
        assert read_cache(name) == {"good": good}
    assert f"{len(bad)} entries not a valid measurement, dropped" in caplog.text
    on_disk = json.loads((tmp_path / name).read_text())["entries"]
    assert on_disk == {"good": good}, "rewritten without them"
    caplog.clear()
    assert read_cache(name) == {"good": good} and caplog.text == ""  # said once


def test_a_bad_entry_of_this_host_is_measured_again_not_a_traceback(monkeypatch, tmp_path):
    import torch

    import lungbench.measure.peak as peak
    from lungbench.core.cache import where_key
    from lungbench.predict.devices import at_threads, measure_conv_rates

    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("lungbench.switches.bf16_supported", lambda device: False)
    monkeypatch.setattr(peak, "conv_rate", lambda device, dtype: 7e10)
    with at_threads(1):
        key = where_key(torch.device("cpu"))
    plant(devices.CONV_FILE, {key: {"fp32": "fast"}})
    assert measure_conv_rates(1) == {"fp32": 7e10}
