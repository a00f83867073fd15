"""`lungbench bench` end to end on a tiny sweep, and every bad input from issue 2."""

from __future__ import annotations

import json

import h5py
import pandas as pd
import pytest
import torch

from lungbench.cli import main
from lungbench.core.runs import read_json, read_records

TINY = [
    "--preset",
    "dey2018",
    "--batch",
    "2",
    "4",
    "--filters",
    "2",
    "4",
    "--repeats",
    "2",
    "--warmup",
    "1",
    "--epoch-samples",
    "8",
]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_tiny_sweep_writes_every_file(tmp_path, capsys, tiny_store):
    code, out, err = run_cli(
        capsys,
        "bench",
        *TINY,
        "--store",
        str(tiny_store),
        "--out",
        str(tmp_path),
        "--run-id",
        "tiny",
        "--batch",
        "2",
        "4",
        "2",  # given twice: measured once
        "--no-tune",  # tuning has its own tests (test_tuning); this one is about the files
    )
    assert code == 0, err
    run = tmp_path / "tiny"
    assert read_json(run / "run.json")["status"] == "complete"
    config = read_json(run / "config.json")
    assert config["request"]["filters"] == [2, 4] and config["configs"] == 4
    env = read_json(run / "environment.json")
    assert env["torch"]["version"] and env["peak_flops_fp32"]["cpu"] > 0
    records = read_records(run)
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"}
    for r in records:
        assert r["epoch_samples"] == 8 and r["epoch_s"] > 0
        assert len(r["samples_s"]["step"]) == 2
        assert r["step_s_median"] > 0 and r["flops_per_step"] > 0
        assert 0 < r["peak_fraction"] <= 1 and isinstance(r["peak_exceeded"], bool)
        # against the peak of the dtype the math ran in (bf16 autocast on CPU by default)
        peak = env["peak_flops"]["cpu"][r["dtype_used"]]
        assert r["peak_dtype"] == r["dtype_used"] and r["peak_flops"] == peak
        assert r["peak_fraction"] == pytest.approx(r["achieved_flops"] / peak)
        assert r["threads_used"] >= 1 and r["platform"].startswith("cpu (")
        assert (r["world_size"], r["nodes"], r["backend"], r["launcher"]) == (1, 1, "none", "none")
    for name in ("summary", "measurements", "speedup_b2", "speedup_b4"):
        assert (run / "tables" / f"{name}.csv").exists()
        assert (run / "tables" / f"{name}.md").exists()
    for name in ("step_time", "throughput", "speedup_b2"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000
    table = pd.read_csv(run / "tables" / "speedup_b2.csv", index_col=0)
    assert list(table.columns) == [
        "Filters = 2 | Exec. time (s)",
        "Filters = 2 | Speed-up",
        "Filters = 4 | Exec. time (s)",
        "Filters = 4 | Speed-up",
        "busy",  # measured on a busy machine (lungbench.report.busy)
    ]
    assert table.iloc[0]["Filters = 2 | Speed-up"] == pytest.approx(1.0)
    summary = pd.read_csv(run / "tables" / "summary.csv")
    assert len(summary) == 4 and {"step_s_median", "step_s_p95", "samples_per_s"} <= set(summary)
    assert "| Batch size = 2 | Filters = 2: Exec. time | Filters = 2: Speed-up |" in out
    assert json.loads(out.strip().splitlines()[-1]) == {"configs": 4, "failed": 0}


def test_no_epoch_uses_step_time(tmp_path, capsys, tiny_store):
    code, out, _ = run_cli(
        capsys,
        "bench",
        "--preset",
        "dey2018",
        "--batch",
        "2",
        "--filters",
        "2",
        "--repeats",
        "2",
        "--no-epoch",
        "--store",
        str(tiny_store),
        "--out",
        str(tmp_path),
        "--run-id",
        "ne",
    )
    assert code == 0
    assert "one training step (compute only)" in out
    assert "epoch_s" not in read_records(tmp_path / "ne")[0]


def test_list_models(capsys):
    code, out, _ = run_cli(capsys, "bench", "--list-models")
    assert code == 0 and "dualpath3d" in out.split()


def _bad(tmp_path, capsys, tiny_store, *argv):
    code, out, err = run_cli(
        capsys, "bench", "--store", str(tiny_store), "--out", str(tmp_path / "out"), *argv
    )
    lines = [line for line in err.strip().splitlines() if line]
    return code, lines


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model", "dualpath"], "unknown --model 'dualpath' (did you mean 'dualpath3d'?)"),
        (["--preset", "iso"], "unknown --preset 'iso'"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--device", "cuda"], "--device cuda: no CUDA device on this machine"),
    ],
)
def test_bad_names_are_one_line_usage_errors(tmp_path, capsys, tiny_store, argv, expected):
    code, lines = _bad(tmp_path, capsys, tiny_store, *argv)
    assert code == 2
    assert len(lines) == 1 and expected in lines[0]
    assert not (tmp_path / "out").exists(), "nothing written for bad input"


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--filters", "-1"], ["--batch", "two"]])
def test_numbers_below_one(tmp_path, capsys, tiny_store, argv):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv, "--store", str(tiny_store), "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0]}" in err


def test_missing_truncated_and_wrong_shaped_store(tmp_path, capsys, tiny_store):
    code, lines = _bad(tmp_path, capsys, tmp_path / "absent.h5")
    assert code == 2 and "absent.h5: store not found" in lines[0]
    truncated = tmp_path / "cut.h5"
    truncated.write_bytes(tiny_store.read_bytes()[:4096])
    code, lines = _bad(tmp_path, capsys, truncated)
    assert code == 2 and len(lines) == 1 and "cut.h5: not a readable HDF5 file" in lines[0]
    wrong = tmp_path / "wrong.h5"
    wrong.write_bytes(tiny_store.read_bytes())
    with h5py.File(wrong, "r+") as f:
        data = f["zoom"][:, 0, 0]  # drop the channel and a spatial axis
        del f["zoom"]
        f["zoom"] = data
    code, lines = _bad(tmp_path, capsys, wrong, "--preset", "dey2018")
    assert code == 2 and len(lines) == 1 and "wrong.h5: inputs (1, 5, 50, 50), (50, 50)" in lines[0]
    assert "do not fit --preset dey2018" in lines[0]
    # A smaller zoom cube would still run (global pooling) but measure another network.
    cropped = tmp_path / "cropped.h5"
    cropped.write_bytes(tiny_store.read_bytes())
    with h5py.File(cropped, "r+") as f:
        data = f["zoom"][:, :, :, :25, :25]
        del f["zoom"]
        f["zoom"] = data
    code, lines = _bad(tmp_path, capsys, cropped, "--preset", "dey2018")
    assert code == 2 and len(lines) == 1 and "(1, 5, 25, 25) do not fit" in lines[0]
    code, lines = _bad(tmp_path, capsys, tiny_store)  # the right store, the wrong preset
    assert code == 2 and "use --preset dey2018" in lines[0]
    assert not (tmp_path / "out").exists()


def test_output_folder_is_a_file(tmp_path, capsys, tiny_store):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    code, out, err = run_cli(capsys, "bench", "--store", str(tiny_store), "--out", str(target))
    assert code == 2 and "--out" in err and "not a directory" in err
    assert target.read_text() == "not a folder"


@pytest.mark.parametrize(
    "command",
    [
        ["bench", "--store", "STORE", "--out", "OUT"],
        ["report", "RUN", "--out", "OUT"],
        ["train", "lidc-pretrain", "--quick", "--out", "OUT"],
    ],
)
def test_output_folder_under_a_file_is_one_line(tmp_path, capsys, tiny_store, command):
    """--out below a file: not a NotADirectoryError traceback, one line naming --out."""
    target = tmp_path / "taken"
    target.write_text("not a folder")
    run = tmp_path / "run"
    (run / "tables").mkdir(parents=True)
    (run / "run.json").write_text('{"kind": "bench", "status": "complete"}')
    names = {"STORE": str(tiny_store), "OUT": str(target / "sub"), "RUN": str(run)}
    code, out, err = run_cli(capsys, *[names.get(a, a) for a in command])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "--out" in lines[0] and "is a file" in lines[0]


def test_bad_number_is_one_line_without_the_usage_block(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--batch", "0"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1 and "--batch: must be >= 1" in lines[0]


def test_worker_errors_show_the_workers_own_message():
    from lungbench.core.errors import DataError, message_of

    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\n    raise DataError(...)\n'
        "lungbench.core.errors.DataError: s.h5: dataset 'context' sample 3 has NaN"
    )
    assert message_of(wrapped) == "s.h5: dataset 'context' sample 3 has NaN"
    assert message_of(DataError("first\nsecond")) == "first"


def test_data_synth_cli(tmp_path, capsys):
    out_file = tmp_path / "s.h5"
    code, out, _ = run_cli(
        capsys,
        "data",
        "synth",
        "--kind",
        "lungx",
        "--n",
        "4",
        "--grid",
        "dey2018",
        "--out",
        str(out_file),
    )
    assert code == 0 and "4 samples" in out
    code, out, _ = run_cli(capsys, "data", "info", str(out_file))
    assert code == 0 and "synth-lungx" in out and "'benign': 2" in out
    code, _, err = run_cli(capsys, "data", "synth", "--n", "4", "--out", str(tmp_path))
    assert code == 2 and "is a directory" in err


def test_env_prints_the_record(capsys):
    code, out, _ = run_cli(capsys, "env")
    record = json.loads(out)
    assert code == 0 and record["cpu"]["logical_cores"] >= 1
    # the GPUs it lists are the ones torch sees: none here, each by name on a GPU node
    assert len(record["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert all(gpu.get("name") for gpu in record["gpus"])


def test_unknown_option_is_reported_by_its_command(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", "lidc-pretrain", "--bogus"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1
    assert (
        "unrecognized arguments: --bogus (see `lungbench train lidc-pretrain --help`)" in lines[0]
    )


@pytest.mark.slow  # the fast tier trains nothing
def test_a_planted_load_marks_the_run_busy_everywhere(tmp_path, capsys, tiny_store, monkeypatch):
    """Busy detection end to end: every ContentionWatch of the run finds another process on
    1.2 of 2 cores (planted, whatever this machine runs); the records say busy, the console
    warns, the tables star the cells, the plots carry the red line and the report the banner."""
    from lungbench.measure.contention import ContentionWatch, judge
    from lungbench.report import bench_outputs

    def planted_stop(self):
        self.result = judge(1.2, 0.0, 2, 1.9)
        return self.result

    monkeypatch.setattr(ContentionWatch, "stop", planted_stop)
    marked = []
    real_mark = bench_outputs.mark_figure
    monkeypatch.setattr(bench_outputs, "mark_figure", lambda fig: (marked.append(fig),
                        real_mark(fig)))  # fmt: skip
    argv = ["bench", *TINY, "--no-epoch", "--store", str(tiny_store), "--out", str(tmp_path)]
    code, out, err = run_cli(capsys, *argv, "--run-id", "busy")
    assert code == 0, err
    run = tmp_path / "busy"
    records = read_records(run)
    assert len(records) == 4 and all(r["busy"] for r in records)
    assert all("other processes kept 1.2 of 2 cores busy" in r["busy_reason"] for r in records)
    assert "WARNING: the machine was busy during 4 of 4 configurations" in out + err
    table = pd.read_csv(run / "tables" / "speedup_b2.csv", index_col=0)
    assert list(table["busy"]) == [True]
    assert "* measured while the machine was busy" in (run / "tables" / "speedup_b2.md").read_text()
    # speedup_b2, speedup_b4, step_time and throughput: each picture carries the mark
    assert len(marked) == 4
    assert run_cli(capsys, "report", str(run))[0] == 0
    html = (run / "report.html").read_text()
    assert html.count('<p class="busy">') == 1 and "4 of 4 configurations" in html


@pytest.mark.slow  # loader workers are processes
def test_bench_loader_through_the_cli(tmp_path, capsys, tiny_store):
    argv = ["bench", "--loader", "--store", str(tiny_store), "--preset", "dey2018"]
    argv += ["--filters", "2", "--batch", "2", "--loader-samples", "12", "--workers", "1"]
    code, out, err = run_cli(capsys, *argv, "--out", str(tmp_path), "--run-id", "loader")
    assert code == 0, err
    run = tmp_path / "loader"
    table = pd.read_csv(run / "tables" / "loader.csv", index_col=0)
    assert {"hdf5, 0 workers", "cache, 1 workers"} <= set(table.index)
    assert (table["samples/s"] > 0).all() and "x step rate" in table.columns
    records = read_records(run)
    assert len(records) == len(table) and all(r["samples"] == 12 for r in records)
    assert "loader goal" in out + err and read_json(run / "run.json")["status"] == "complete"


@pytest.mark.slow  # the fast tier trains nothing
def test_bench_threads_through_the_cli(tmp_path, capsys, tiny_store):
    argv = ["bench", "--preset", "dey2018", "--filters", "2", "--batch", "2", "--repeats", "2"]
    argv += ["--no-epoch", "--no-tune", "--threads", "1", "2", "--store", str(tiny_store)]
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path), "--run-id", "threads")
    assert code == 0, err
    records = read_records(tmp_path / "threads")
    assert sorted(r["threads_used"] for r in records) == [1, 2]  # one record per count
    assert all(r["status"] == "ok" and r["step_s_median"] > 0 for r in records)
    assert len({r["key"] for r in records}) == 2
