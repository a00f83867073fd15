"""The device peak: a large matrix product and a large copy, stored by `lungbench env --peak`."""

from __future__ import annotations

import json

import torch

from lungbench.cli import main
from lungbench.peak import copy_bandwidth, matmul_peak_flops, peak_record


def test_peak_record_is_positive():
    cpu = torch.device("cpu")
    record = peak_record(cpu, "fp32", size=256, nbytes=2**22)
    assert record["matmul_flops"] > 0 and record["copy_bytes_per_s"] > 0
    assert record["device"] == "cpu" and record["dtype"] == "fp32" and record["matmul_size"] == 256
    assert matmul_peak_flops(cpu, "bf16", size=64, repeats=1) > 0
    assert copy_bandwidth(cpu, 2**20, repeats=1) > 0


def test_env_peak_is_stored_in_the_record(tmp_path, capsys, monkeypatch):
    import lungbench.peak as peak

    # The CLI path with smaller sizes (the defaults take seconds on 2 cores).
    original = peak.peak_record
    monkeypatch.setattr(
        peak, "peak_record", lambda device, dtype: original(device, dtype, size=256, nbytes=2**22)
    )
    saved = tmp_path / "env.json"
    assert main(["env", "--peak", "--device", "cpu", "--dtype", "fp32", "--save", str(saved)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["peak"]["matmul_flops"] > 0 and printed["peak"]["copy_bytes_per_s"] > 0
    assert json.loads(saved.read_text())["peak"]["dtype"] == "fp32"


def test_env_peak_bad_dtype(capsys):
    assert main(["env", "--peak", "--dtype", "fp64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown --dtype 'fp64'" in err[0]
