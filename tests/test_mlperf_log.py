"""MLPerf-format logs: a fit writes one through mlperf-logging's mllog, and the package's own
compliance checker passes it (and fails a log that lacks run_stop)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lungbench.train.config import TrainConfig
from lungbench.train.engine import FitOptions, fit
from lungbench.train.mlperf_log import LOG_FILE, RULES_FILE, RULESET

pytest.importorskip("mlperf_logging")


class _Pairs(TensorDataset):
    """TensorDataset whose items are ((x,), y), the engine's batch layout."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return (x,), y


def _data(n: int, seed: int) -> _Pairs:
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 2).float()
    x = torch.randn(n, 1, 4, 4, 4, generator=g) + 2.0 * y.view(-1, 1, 1, 1, 1)
    return _Pairs(x, y)


def _fit(run_dir, target: str | None):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
    cfg = TrainConfig(
        epochs=2, batch_size=8, progress=False, log_epochs=False, tensorboard=False, target=target
    )
    return fit(
        net,
        _data(16, 0),
        _data(8, 1),
        cfg,
        run_dir=run_dir,
        options=FitOptions(checkpoint_meta={"model_name": "tiny"}),
    )


def _records(path):
    return [json.loads(line.split(":::MLLOG ", 1)[1]) for line in path.read_text().splitlines()]


def test_fit_writes_the_mlperf_keys_in_order(tmp_path):
    _fit(tmp_path, "loss=100")  # reached after epoch 1: run_stop success
    recs = _records(tmp_path / LOG_FILE)
    keys = [r["key"] for r in recs]
    assert keys.index("init_start") < keys.index("init_stop") < keys.index("run_start")
    assert keys[-1] == "run_stop" and recs[-1]["metadata"]["status"] == "success"
    assert keys.count("epoch_start") == 1 and keys.count("eval_accuracy") == 1
    by_key = {r["key"]: r["value"] for r in recs}
    assert by_key["submission_benchmark"] == "lungbench_tiny"
    assert by_key["global_batch_size"] == 8 and by_key["train_samples"] == 16
    assert by_key["eval_samples"] == 8 and by_key["target_quality"] == "loss=100"


def test_unreached_target_is_an_aborted_run(tmp_path):
    _fit(tmp_path, "loss=0")
    recs = _records(tmp_path / LOG_FILE)
    assert recs[-1]["key"] == "run_stop" and recs[-1]["metadata"]["status"] == "aborted"
    assert [r["key"] for r in recs].count("epoch_stop") == 2


def _check(log, rules, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mlperf_logging.compliance_checker",
            "--usage",
            "hpc",
            "--ruleset",
            RULESET,
            "--config",
            str(rules),
            "--log_output",
            str(tmp_path / "checker.log"),
            str(log),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_compliance_checker_passes_a_quick_runs_log_and_fails_a_broken_one(tmp_path):
    run = tmp_path / "run"
    _fit(run, "auc=0.5")
    done = _check(run / LOG_FILE, run / RULES_FILE, tmp_path)
    verdict = (tmp_path / "checker.log").read_text()
    assert done.returncode == 0 and "SUCCESS" in verdict, done.stdout + done.stderr + verdict
    # The same log without run_stop is no complete MLPerf run: the checker must say so.
    broken = tmp_path / "broken.log"
    lines = (run / LOG_FILE).read_text().splitlines()
    broken.write_text("\n".join(x for x in lines if '"run_stop"' not in x) + "\n")
    failed = _check(broken, run / RULES_FILE, tmp_path)
    assert failed.returncode == 1 and "FAILED" in (tmp_path / "checker.log").read_text()
