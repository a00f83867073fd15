"""Layer 9 (train): an MLPerf-style log of a fit, written through `mlperf_logging.mllog`, and the rules to check it.

MLPerf HPC ranks systems by time-to-train with logs in its own format (`:::MLLOG {json}`
lines), checked by its compliance checker. The engine writes one per fit with a run folder
(RUN/mlperf.log; a resumed fit RUN/mlperf-resumed.log, since MLPerf has no resume): the
submission keys, cache_clear, init_start/stop, the hyperparameters, run_start, per epoch
epoch_start/stop and eval_start/stop with eval_accuracy, and run_stop with its status
("success" when the --target was reached, "aborted" otherwise: MLPerf's meaning).

The checker's own HPC rules (`hpc_3.0.0/common.yaml` of the installed package) accept only
MLPerf's four benchmarks (deepcam, cosmoflow, oc20, openfold) as submission_benchmark.
`write_rules` therefore writes RUN/mlperf_rules.yaml: the package's common rules as they are,
with that one check opened to lungbench's benchmarks and the benchmark-specific rules
lungbench's logs promise (eval_accuracy per evaluation, batch size, optimizer, learning rate,
seed). Check a log with the package's checker:

    python -m mlperf_logging.compliance_checker --usage hpc --ruleset 3.0.0 \\
        --config RUN/mlperf_rules.yaml RUN/mlperf.log
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LOG_FILE = "mlperf.log"
RESUMED_LOG_FILE = "mlperf-resumed.log"
RULES_FILE = "mlperf_rules.yaml"
RULESET = "3.0.0"  # the MLPerf HPC rules the log follows (`--usage hpc --ruleset 3.0.0`)
BENCHMARK_PREFIX = "lungbench_"  # submission_benchmark: lungbench_<model>
ORG = "lungbench"
_ids = itertools.count()  # one Python logger per log file (several fits in one process)


class MLPerfLog:
    """The MLPerf log of one fit (rank 0's; None-safe: the engine keeps one only with a run
    folder). Each method writes the keys of one moment of the run."""

    def __init__(self, path: Path, model_name: str | None) -> None:
        from mlperf_logging.mllog import constants, mllog

        # Our own Python logger with only a file handler: mllog's shared default logger also
        # prints every line to stdout, which is the command's output.
        self._logger = logging.getLogger(f"lungbench.mlperf.{next(_ids)}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._handler = logging.FileHandler(path, mode="w")
        self._logger.addHandler(self._handler)
        self.path = path
        self.ml = mllog.MLLogger(logger=self._logger, default_stack_offset=2)
        self.c = constants
        self.benchmark = BENCHMARK_PREFIX + (model_name or "model")

    def start(self, hyper: Mapping[str, Any], train_samples: int, eval_samples: int) -> None:
        """Submission keys, init (hyperparameters inside), then run_start."""
        c, ml = self.c, self.ml
        ml.event(c.SUBMISSION_ORG, ORG)
        ml.event(c.SUBMISSION_PLATFORM, _platform())
        ml.event(c.SUBMISSION_DIVISION, "open")  # lungbench's own benchmark: open division
        ml.event(c.SUBMISSION_STATUS, "research")
        ml.event(c.SUBMISSION_BENCHMARK, self.benchmark)
        ml.event(c.CACHE_CLEAR, False)  # no page-cache drop: the data is generated or cached
        ml.start(c.INIT_START)
        for key, value in hyper.items():
            ml.event(key, value)
        ml.event(c.TRAIN_SAMPLES, int(train_samples))
        ml.event(c.EVAL_SAMPLES, int(eval_samples))
        ml.end(c.INIT_STOP)
        ml.start(c.RUN_START)

    def epoch_start(self, epoch: int) -> None:
        self.ml.start(self.c.EPOCH_START, metadata={self.c.EPOCH_NUM: epoch})

    def epoch_stop(self, epoch: int) -> None:
        self.ml.end(self.c.EPOCH_STOP, metadata={self.c.EPOCH_NUM: epoch})

    def eval_start(self, epoch: int) -> None:
        self.ml.start(self.c.EVAL_START, metadata={self.c.EPOCH_NUM: epoch})

    def eval_stop(self, epoch: int, accuracy: float, extra: Mapping[str, float]) -> None:
        """eval_accuracy (the target's metric, or the AUC) and the other validation values
        under their own keys, then eval_stop."""
        meta = {self.c.EPOCH_NUM: epoch}
        self.ml.event(self.c.EVAL_ACCURACY, float(accuracy), metadata=meta)
        for key, value in extra.items():
            self.ml.event(key, float(value), metadata=meta)
        self.ml.end(self.c.EVAL_STOP, metadata=meta)

    def stop(self, reached: bool | None) -> None:
        """run_stop: success when the target was reached (or the planned epochs ran without
        a target), aborted when a target was not reached."""
        status = self.c.SUCCESS if reached is None or reached else self.c.ABORTED
        self.ml.end(self.c.RUN_STOP, metadata={self.c.STATUS: status})

    def close(self) -> None:
        self._handler.close()
        self._logger.removeHandler(self._handler)


def hyperparameters(config: Any, world_size: int) -> dict[str, Any]:
    """The hyperparameter keys MLPerf logs (global batch size over all ranks)."""
    from mlperf_logging.mllog import constants as c

    hyper = {
        c.GLOBAL_BATCH_SIZE: int(config.batch_size) * int(world_size),
        c.OPT_NAME: str(config.optimizer),
        c.OPT_BASE_LR: float(config.lr),
        c.SEED: int(config.seed),
        "opt_weight_decay": float(config.weight_decay),
        "number_of_ranks": int(world_size),
    }
    if config.target is not None:
        hyper["target_quality"] = str(config.target)
    return hyper


def write_rules(path: Path) -> Path:
    """RUN/mlperf_rules.yaml: the installed checker's HPC common rules, the benchmark-name
    check opened to lungbench's benchmarks, plus the rules of lungbench's benchmarks."""
    import yaml
    from mlperf_logging import compliance_checker

    common = Path(compliance_checker.__file__).parent / f"hpc_{RULESET}" / "common.yaml"
    rules = yaml.safe_load(common.read_text())
    for item in rules:
        key = item.get("KEY", {})
        if key.get("NAME") == "submission_division":
            # its POST enqueues the division's file, whose only rule is MLPerf's benchmark list
            key.pop("POST", None)
        if key.get("NAME") == "submission_benchmark":
            key["CHECK"] = f" v['value'].startswith('{BENCHMARK_PREFIX}') "
            key.pop("POST", None)
    rules += [{"KEY": k} for k in _LUNGBENCH_RULES]
    path.write_text(
        "# Generated by lungbench.train.mlperf_log from the installed mlperf-logging's\n"
        f"# hpc_{RULESET}/common.yaml (see that module's docstring).\n"
        + yaml.safe_dump(rules, sort_keys=False)
    )
    return path


_LUNGBENCH_RULES = [
    {"NAME": "global_batch_size", "REQ": "EXACTLY_ONE", "CHECK": " v['value'] > 0"},
    {"NAME": "opt_name", "REQ": "EXACTLY_ONE", "CHECK": " v['value'] != ''"},
    {"NAME": "opt_base_learning_rate", "REQ": "EXACTLY_ONE", "CHECK": " v['value'] > 0."},
    {"NAME": "seed", "REQ": "EXACTLY_ONE"},
    {
        "NAME": "eval_accuracy",
        "REQ": "AT_LEAST_ONE",
        "CHECK": ["'epoch_num' in v['metadata']"],
    },
]


def _platform() -> str:
    import platform

    return f"{platform.node() or 'host'} ({platform.machine()})"


class NullLog:
    """Stands in for MLPerfLog where none is written (no run folder, not rank 0, or the
    mlperf-logging package missing)."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def open_log(run_dir: Path | None, model_name: str | None, resumed: bool) -> MLPerfLog | NullLog:
    """The fit's MLPerf log in `run_dir` (with mlperf_rules.yaml beside it), or a NullLog."""
    if run_dir is None:
        return NullLog()
    try:
        import mlperf_logging  # noqa: F401 - a dependency; an old install may lack it
    except ImportError:
        logging.getLogger(__name__).warning("note: no MLPerf log (pip install mlperf-logging)")
        return NullLog()
    write_rules(run_dir / RULES_FILE)
    return MLPerfLog(run_dir / (RESUMED_LOG_FILE if resumed else LOG_FILE), model_name)
