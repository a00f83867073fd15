"""init_distributed under torchrun / SLURM / MPI environments, the SLURM node-list parser,
failure behaviour (a hung rank, a rendezvous that never completes), DDP training under
torchrun and mpiexec, and the hpc/ job scripts (run against a fake srun/scontrol)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from launchenv import REPO, clean_env

from lungbench.core.errors import UsageError
from lungbench.core.runs import read_json
from lungbench.distributed.group import (
    DistContext,
    DistributedError,
    barrier,
    gather_records,
    init_distributed,
    parameter_digest,
    rank0_print,
    shutdown,
    threads_per_rank,
    wrap_model,
)
from lungbench.distributed.launch import detect_launcher, parse_nodelist, resolve_launch, slurm_port

VENV_BIN = Path(sys.executable).parent
MPIEXEC = VENV_BIN / "mpiexec" if (VENV_BIN / "mpiexec").exists() else shutil.which("mpiexec")
needs_mpiexec = pytest.mark.skipif(
    MPIEXEC is None, reason="no mpiexec (pip install 'lungbench[mpi]')"
)


def free_slurm_job_id() -> int:
    """A job id whose derived rendezvous port is free on this host right now."""
    for job_id in range(os.getpid() % 20000, os.getpid() % 20000 + 2000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm_port(job_id)))
            except OSError:
                continue
            return job_id
    pytest.skip("no free port in the SLURM port range")


# ---------------------------------------------------------------------------- node lists


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("a1,b[2-3]", ["a1", "b2", "b3"]),
        ("gpu007", ["gpu007"]),
        ("r[1-2]-n[8-9]", ["r1-n8", "r1-n9", "r2-n8", "r2-n9"]),
        ("cn[098-101],login", ["cn098", "cn099", "cn100", "cn101", "login"]),
        ("", []),
    ],
)
def test_parse_nodelist(text, hosts):
    assert parse_nodelist(text) == hosts


@pytest.mark.parametrize("text", ["node[01-03", "node01]", "node[3-1]", "node[a-b]"])
def test_parse_nodelist_rejects_malformed(text):
    with pytest.raises(ValueError, match="node list"):
        parse_nodelist(text)


# ---------------------------------------------------------------------------- environments

SLURM_4X2 = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NODELIST": "m100n[012-013]",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_JOB_ID": "123456",
}


def test_slurm_environment_is_read():
    info = resolve_launch(SLURM_4X2)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("slurm", 5, 8, 1)
    assert (info.nodes, info.local_world_size) == (2, 4)
    assert info.master_addr == "m100n012"
    assert info.master_port == slurm_port("123456") == 10000 + 123456 % 20000


def test_slurm_step_variables_and_overrides_win():
    env = {
        **SLURM_4X2,
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_STEP_NODELIST": "m100n013",
        "MASTER_PORT": "4321",
    }
    info = resolve_launch(env)
    assert (info.world_size, info.nodes, info.master_addr, info.master_port) == (
        2,
        1,
        "m100n013",
        4321,
    )
    assert resolve_launch({**env, "MASTER_ADDR": "10.0.0.1"}).master_addr == "10.0.0.1"


def test_slurm_single_task_is_a_single_process():
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_LOCALID": "0",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "node[01-03]",
        "SLURM_JOB_ID": "77",
    }
    ctx = init_distributed("cpu", timeout_s=5, env=env)
    assert ctx == DistContext(launcher="slurm", timeout_s=5)
    assert ctx.is_main and not ctx.is_distributed
    assert gather_records(ctx, {"a": 1}) == [{"a": 1}]
    barrier(ctx)
    shutdown(ctx)


@pytest.mark.parametrize(
    ("env", "launcher"),
    [
        ({}, "none"),
        ({"RANK": "0", "WORLD_SIZE": "2", **SLURM_4X2}, "torchrun"),
        ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALNRANKS": "2"}, "mpi"),  # MPICH hydra
        ({"OMPI_COMM_WORLD_SIZE": "4", **SLURM_4X2}, "mpi"),  # mpirun inside an allocation
        ({"PMI_SIZE": "8", **SLURM_4X2}, "slurm"),  # srun --mpi=pmi2
        (SLURM_4X2, "slurm"),
        ({"LUNGBENCH_LAUNCHER": "none", **SLURM_4X2}, "none"),
    ],
)
def test_launcher_precedence(env, launcher):
    assert detect_launcher(env) == launcher


def test_torchrun_environment_is_read():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "3",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "29400",
    }
    info = resolve_launch(env)
    assert (info.rank, info.world_size, info.local_rank, info.nodes) == (3, 8, 3, 2)
    assert (info.master_addr, info.master_port) == ("n1", 29400)


@pytest.mark.parametrize(
    ("env", "kw", "message"),
    [
        ({"LUNGBENCH_LAUNCHER": "srun"}, {}, "unknown LUNGBENCH_LAUNCHER 'srun'"),
        ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, {}, "SLURM_PROCID='x' is not an integer"),
        ({}, {"timeout_s": 0}, "--dist-timeout must be > 0"),
        ({}, {"device": "tpu"}, "device 'tpu'"),
    ],
)
def test_bad_environments_are_usage_errors(env, kw, message):
    with pytest.raises(UsageError, match=message):
        init_distributed(env=env, **{"device": "cpu", **kw})


def test_cuda_without_gpu_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU node too: planted
    with pytest.raises(UsageError, match="no CUDA device"):
        init_distributed("cuda", env={})


def test_helpers_for_a_single_process(capsys):
    ctx = DistContext()
    rank0_print(ctx, "only once")
    rank0_print(DistContext(rank=1, world_size=2), "never")
    assert capsys.readouterr().out == "only once\n"
    assert threads_per_rank(ctx) >= 1
    layer = torch.nn.Linear(3, 2)
    assert wrap_model(layer, ctx) is layer  # one process: no DDP wrapper
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert parameter_digest(a) == parameter_digest(b)
    with torch.no_grad():
        b.bias[0] += 1e-7
    assert parameter_digest(a) != parameter_digest(b)


# ---------------------------------------------------------------------------- real processes

HANG_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    from lungbench.distributed.group import (
        DistributedError, barrier, exit_now, gather_records, group_is_broken, init_distributed)
    ctx = init_distributed("cpu", timeout_s=float(sys.argv[1]))
    got = gather_records(ctx, {"rank": ctx.rank, "world": ctx.world_size,
                               "launcher": ctx.launcher, "master": ctx.master})
    if ctx.is_main:
        print(json.dumps(got), flush=True)
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # alive but silent: only a timeout can end this
    start = time.perf_counter()
    try:
        barrier(ctx, "the test's barrier")
    except DistributedError as exc:
        print(f"waited {time.perf_counter() - start:.1f} s: {exc}", flush=True)
        assert group_is_broken()
        exit_now(exc.exit_code)  # as the CLI does: the group's threads still wait on rank 1
""")


@pytest.mark.timeout(360)  # above its own subprocess limits, which say what hung
@pytest.mark.distributed
def test_slurm_group_forms_and_a_hung_rank_times_out(tmp_path):
    """Two processes with SLURM variables (as srun starts them; port from the job id): they
    form a Gloo group and gather; then rank 1 stops answering and rank 0 gets a one-line
    error after the timeout instead of hanging."""
    script = tmp_path / "hang.py"
    script.write_text(HANG_SCRIPT)
    job_id, timeout = free_slurm_job_id(), 4
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(timeout)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(
                SLURM_PROCID=str(rank),
                SLURM_NTASKS="2",
                SLURM_LOCALID=str(rank),
                SLURM_NNODES="1",
                SLURM_JOB_NODELIST="localhost,node[2-3]",
                SLURM_JOB_ID=str(job_id),
            ),
        )
        for rank in range(2)
    ]
    try:
        out, err = procs[0].communicate(timeout=180)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == DistributedError.exit_code, err
    gathered, message = out.strip().splitlines()
    assert json.loads(gathered) == [
        {"rank": r, "world": 2, "launcher": "slurm", "master": f"localhost:{slurm_port(job_id)}"}
        for r in range(2)
    ]
    waited = float(message.split()[1])
    assert timeout - 0.5 <= waited <= timeout + 15, message
    assert "rank 0 of 2 (slurm, gloo): the test's barrier failed" in message
    assert f"did not answer within {timeout} s" in message


RENDEZVOUS_SCRIPT = textwrap.dedent("""
    import sys, time
    from lungbench.distributed.group import DistributedError, init_distributed
    start = time.perf_counter()
    try:
        init_distributed("cpu", timeout_s=float(sys.argv[1]))
    except DistributedError as exc:
        print(f"{time.perf_counter() - start:.1f} {exc}", flush=True)
        sys.exit(exc.exit_code)
""")


@pytest.mark.timeout(360)  # above its own subprocess limits, which say what hung
@pytest.mark.distributed
def test_rendezvous_that_never_completes_ends_with_one_line(tmp_path):
    """Rank 0 of a 2-task SLURM step whose rank 1 never starts: a clear error, no hang."""
    script = tmp_path / "rendezvous.py"
    script.write_text(RENDEZVOUS_SCRIPT)
    env = clean_env(
        SLURM_PROCID="0",
        SLURM_NTASKS="2",
        SLURM_LOCALID="0",
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_ID=str(free_slurm_job_id()),
    )
    proc = subprocess.run(
        [sys.executable, str(script), "2"], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == DistributedError.exit_code, proc.stderr[-2000:]
    waited, message = proc.stdout.strip().split(" ", 1)
    assert float(waited) < 2 * 1.1 + 10, "the watchdog or torch's timeout must end it"
    assert message.startswith("rank 0 of 2 (slurm): rendezvous at localhost:")
    assert "did not complete within 2 s" in message


TRAIN_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from torch import nn
    from torch.utils.data import Dataset
    from lungbench.distributed.group import init_distributed, parameter_digest, shutdown
    from lungbench.train.engine import TrainConfig, fit

    class Blobs(Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.y = (torch.arange(n) % 2).float()
            self.x = torch.randn(n, 1, 6, 6, 6, generator=g)
            self.x[self.y == 1, :, 2:4, 2:4, 2:4] += 2.0
        def __len__(self):
            return len(self.y)
        def __getitem__(self, i):
            return (self.x[i],), self.y[i]

    out = Path(sys.argv[1])
    ctx = init_distributed("cpu", timeout_s=60)
    torch.manual_seed(ctx.rank)  # different initial weights: DDP must broadcast rank 0's
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                          nn.AdaptiveMaxPool3d(1), nn.Flatten(), nn.Linear(4, 1))
    config = TrainConfig(epochs=2, batch_size=4, lr=0.01, seed=1, progress=False,
                         tensorboard=False, restore_best=False)
    result = fit(model, Blobs(40, 0), Blobs(12, 1), config, run_dir=out / f"run-rank{ctx.rank}",
                 dist=ctx)
    (out / f"rank{ctx.rank}.json").write_text(json.dumps({
        "digest": parameter_digest(model), "world": ctx.world_size,
        "launcher": ctx.launcher, "val_loss": list(result.history["val_loss"])}))
    shutdown(ctx)
""")


def check_ddp_training(tmp_path: Path, launch: list[str], launcher: str) -> None:
    """Run TRAIN_SCRIPT with 2 processes started by `launch`; check what both ranks report
    and that only rank 0 wrote."""
    script = tmp_path / "train_ddp.py"
    script.write_text(TRAIN_SCRIPT)
    proc = subprocess.run(
        [*launch, str(script), str(tmp_path)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"] and len(ranks[0]["val_loss"]) == 2
    assert {r["world"] for r in ranks} == {2} and {r["launcher"] for r in ranks} == {launcher}
    written = tmp_path / "run-rank0"
    assert (written / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs
    assert (written / "checkpoint_last.pt").exists()
    assert not (tmp_path / "run-rank1").exists(), "rank 1 must not write"


@pytest.mark.distributed
def test_ddp_training_under_torchrun(tmp_path):
    """fit() with 2 processes: identical weights on both ranks after 20 steps (10 per epoch),
    the same validation losses, and metrics/checkpoints written by rank 0 only."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    check_ddp_training(tmp_path, [*launch, "2"], "torchrun")


@pytest.mark.distributed
@needs_mpiexec
def test_ddp_training_under_mpiexec(tmp_path):
    """The same with mpiexec as the launcher (rank and size through mpi4py)."""
    pytest.importorskip("mpi4py")
    check_ddp_training(tmp_path, [str(MPIEXEC), "-n", "2", sys.executable], "mpi")


@pytest.mark.timeout(480)  # above its own subprocess limits, which say what hung
@pytest.mark.distributed
@needs_mpiexec
def test_lidc_pretrain_under_mpiexec_trains_with_ddp(tmp_path):
    """`mpiexec -n 2 python -m lungbench train lidc-pretrain`: as under torchrun
    (tests/test_experiments_3d.py), rank 0 generates the data and writes the one run folder,
    a complete 2-process run, and prints one summary."""
    pytest.importorskip("mpi4py")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "lungbench", "train", "lidc-pretrain", "--quick"]
    argv += ["--epochs", "2", "--synth-n", "16", "--out", str(out), "--run-id", "ddp"]
    argv += ["--no-progress", "--dist-timeout", "120"]
    proc = subprocess.run(
        [str(MPIEXEC), "-n", "2", *argv],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results: ") == 1, "rank 0 alone prints"
    assert "DDP x2 (gloo)" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["data", "ddp"]
    run = out / "ddp"
    assert read_json(run / "run.json")["status"] == "complete"
    dist = read_json(run / "config.json")["distributed"]
    assert (dist["world_size"], dist["launcher"], dist["backend"]) == (2, "mpi", "gloo")
    assert (run / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs
    assert (run / "checkpoint_best.pt").exists()
    assert (run / "checkpoint_last.pt").exists()


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from torch import nn
    from torch.utils.data import Dataset
    from lungbench.distributed.group import init_distributed, parameter_digest, shutdown
    from lungbench.train.engine import TrainConfig, fit

    class NoisyBlobs(Dataset):
        # Draws rank-dependent amounts of random noise per item, so every rank's random
        # stream is in a different state at a checkpoint (as with per-rank augmentation).
        def __init__(self, n, seed, rank):
            g = torch.Generator().manual_seed(seed)
            self.y = (torch.arange(n) % 2).float()
            self.x = torch.randn(n, 1, 6, 6, 6, generator=g)
            self.x[self.y == 1, :, 2:4, 2:4, 2:4] += 2.0
            self.rank = rank
        def __len__(self):
            return len(self.y)
        def __getitem__(self, i):
            noise = torch.rand(1 + self.rank)[-1] * 0.1
            return (self.x[i] + noise,), self.y[i]

    out, epochs, resume = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] or None
    ctx = init_distributed("cpu", timeout_s=60)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool3d(1),
                          nn.Flatten(), nn.Dropout(0.3), nn.Linear(4, 1))
    config = TrainConfig(epochs=epochs, batch_size=4, lr=0.01, seed=1, progress=False,
                         tensorboard=False, restore_best=False)
    fit(model, NoisyBlobs(24, 0, ctx.rank), NoisyBlobs(8, 1, 0), config, run_dir=out,
        dist=ctx, resume=resume)
    if ctx.rank == 0:
        (out / "digest.txt").write_text(parameter_digest(model))
    shutdown(ctx)
""")


@pytest.mark.timeout(420)  # above its own subprocess limits, which say what hung
@pytest.mark.distributed
def test_ddp_training_resumes_exactly_with_every_ranks_random_streams(tmp_path):
    """2 epochs under torchrun == 1 epoch, then a resumed 2nd epoch: each rank continues its
    own random streams (saved by rank 0 for all); another world size is refused."""
    script = tmp_path / "resume_ddp.py"
    script.write_text(RESUME_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]

    def train(out: Path, epochs: int, resume: str = "", nproc: int = 2):
        launch = [*torchrun, "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
        return subprocess.run(
            [*launch, str(script), str(out), str(epochs), resume],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=240,
        )

    for proc in (train(tmp_path / "whole", 2), train(tmp_path / "cut", 1)):
        assert proc.returncode == 0, proc.stderr[-3000:]
    last = tmp_path / "cut" / "checkpoint_last.pt"
    resumed = train(tmp_path / "resumed", 2, str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    digest = (tmp_path / "whole" / "digest.txt").read_text()
    assert (tmp_path / "resumed" / "digest.txt").read_text() == digest
    alone = train(tmp_path / "alone", 2, str(last), nproc=1)
    assert alone.returncode != 0 and "written by a run of 2 process(es)" in alone.stderr


# ---------------------------------------------------------------------------- hpc/ scripts

SLURM_DIR = REPO / "hpc" / "slurm"
SBATCH_SCRIPTS = sorted(p.name for p in SLURM_DIR.glob("*.sbatch"))
# A stand-in for srun: records its arguments and environment; with FAKE_SRUN_WAIT it runs
# until SIGTERM (a step at the time limit) and records the signal. Its trap is set before
# srun.args appears, so a signal sent once the test sees that file is always caught.
FAKE_SRUN = """#!/bin/bash
if [ -n "${FAKE_SRUN_WAIT:-}" ]; then
    trap '[ -n "${child:-}" ] && kill $child; echo TERM > "$FAKE_LOG/srun.signal"; exit 143' TERM
fi
{ printf '%s\\n' "$@"; echo "SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-}";
  echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-}"; } > "$FAKE_LOG/srun.args.tmp"
mv "$FAKE_LOG/srun.args.tmp" "$FAKE_LOG/srun.args"
if [ -n "${FAKE_SRUN_WAIT:-}" ]; then
    sleep 60 & child=$!
    wait
fi
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" > "$FAKE_LOG/scontrol.args"
"""


def test_sbatch_scripts_parse_and_ask_for_the_pre_timeout_signal():
    assert SBATCH_SCRIPTS == ["multi_node.sbatch", "one_node.sbatch", "sweep_array.sbatch"]
    for path in [*SLURM_DIR.iterdir(), *(REPO / "hpc").glob("**/*.sh")]:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"
    for name in SBATCH_SCRIPTS:
        lines = (SLURM_DIR / name).read_text().splitlines()
        assert "#SBATCH --requeue" in lines, name
        assert any(line.startswith("#SBATCH --signal=B:USR1@") for line in lines), name


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="no shellcheck")
def test_hpc_scripts_pass_shellcheck():
    scripts = [*sorted(SLURM_DIR.iterdir()), *sorted((REPO / "hpc").glob("**/*.sh"))]
    proc = subprocess.run(
        ["shellcheck", "-x", *(str(p.relative_to(REPO)) for p in scripts)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout


def fake_slurm(tmp_path: Path) -> tuple[Path, Path]:
    """A bin folder with the fake srun and scontrol, and the folder they log to."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in [("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir, log


def job_env(tmp_path: Path, bin_dir: Path, log: Path, **extra: str) -> dict[str, str]:
    """A batch job's environment as SLURM sets it (job 4242, 3 cores per task), with the
    generic profile (no LB_PROFILE given) and LB_OUT in tmp_path."""
    env = {k: v for k, v in clean_env().items() if not k.startswith("LB_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        FAKE_LOG=str(log),
        LB_OUT=str(tmp_path / "out"),
        LB_VENV=str(tmp_path / "no-venv"),
        SLURM_JOB_ID="4242",
        SLURM_CPUS_PER_TASK="3",
        SLURM_NTASKS="4",
    )
    env.update(extra)
    return env


def run_job(name: str, env: dict[str, str]) -> tuple[list[str], str]:
    """Run hpc/slurm/NAME as sbatch would (from the repository root): srun's arguments
    and environment lines, and the job's stderr."""
    log = Path(env["FAKE_LOG"])
    (log / "srun.args").unlink(missing_ok=True)
    proc = subprocess.run(
        ["bash", str(SLURM_DIR / name)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return (log / "srun.args").read_text().splitlines(), proc.stderr


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@pytest.mark.parametrize("name", ["one_node.sbatch", "multi_node.sbatch"])
def test_sbatch_job_keeps_its_run_id_and_resumes(tmp_path, name):
    """srun gets the cores per task (Slurm >= 22.05) and --run-id slurm-<job id>; once that
    run folder exists (a requeued job), a 1-task bench resumes it, while a bench of several
    ranks (a sweep cannot --resume under a launcher) starts afresh and says so; training
    resumes from its newest checkpoint with any number of ranks."""
    bin_dir, log = fake_slurm(tmp_path)
    env = job_env(tmp_path, bin_dir, log)
    args, _ = run_job(name, env)
    assert args[:4] == ["--kill-on-bad-exit=1", "python", "-m", "lungbench"]
    assert args[4] == "bench" and option(args, "--out") == str(tmp_path / "out")
    assert option(args, "--run-id") == "slurm-4242" and "--resume" not in args
    assert option(args, "--device") == "cuda"
    assert "SRUN_CPUS_PER_TASK=3" in args and "OMP_NUM_THREADS=3" in args  # generic profile

    (tmp_path / "out" / "slurm-4242").mkdir(parents=True)  # the first attempt's run folder
    args, err = run_job(name, env)
    assert option(args, "--run-id") == "slurm-4242" and "--resume" not in args
    assert "starts a new run folder" in err

    args, _ = run_job(name, {**env, "SLURM_NTASKS": "1"})
    assert option(args, "--run-id") == "slurm-4242"
    assert option(args, "--resume") == "slurm-4242"

    # Training resumes from the newest checkpoint of the job's run folders.
    train = {**env, "SLURM_NTASKS": "1", "LB_COMMAND": "train lidc-pretrain"}
    args, _ = run_job(name, train)
    assert args[4:6] == ["train", "lidc-pretrain"] and "--resume" not in args
    first, second = (
        tmp_path / "out" / f / "checkpoint_last.pt" for f in ["slurm-4242", "slurm-4242-2"]
    )
    second.parent.mkdir()
    first.write_bytes(b"1")
    second.write_bytes(b"2")
    os.utime(first, (time.time() - 100, time.time() - 100))
    args, _ = run_job(name, train)
    assert option(args, "--resume") == str(second)
    args, _ = run_job(name, {**train, "SLURM_NTASKS": "4"})  # DDP training resumes too
    assert option(args, "--resume") == str(second)


def test_sweep_array_task_resumes_its_run_folder(tmp_path):
    bin_dir, log = fake_slurm(tmp_path)
    env = job_env(
        tmp_path, bin_dir, log, SLURM_NTASKS="1", SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="5"
    )
    args, _ = run_job("sweep_array.sbatch", env)
    assert (option(args, "--batch"), option(args, "--filters")) == ("4", "16")  # pair 5 of 4 x 2
    assert option(args, "--run-id") == "sweep-77-b4-f16" and "--resume" not in args
    assert "SRUN_CPUS_PER_TASK=3" in args
    (tmp_path / "out" / "sweep-77-b4-f16").mkdir(parents=True)
    args, _ = run_job("sweep_array.sbatch", env)
    assert option(args, "--resume") == "sweep-77-b4-f16"


def test_sbatch_job_requeues_on_the_pre_timeout_signal(tmp_path):
    """SIGUSR1 to the batch shell (--signal=B:USR1@120): SIGTERM to the step, then
    `scontrol requeue <job id>` and exit 0."""
    bin_dir, log = fake_slurm(tmp_path)
    env = job_env(tmp_path, bin_dir, log, FAKE_SRUN_WAIT="1")
    job = subprocess.Popen(
        ["bash", str(SLURM_DIR / "one_node.sbatch")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (log / "srun.args").exists():
            assert time.monotonic() < deadline and job.poll() is None, "srun never started"
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)
        out, err = job.communicate(timeout=30)
    finally:
        job.kill()
        job.wait()
    assert job.returncode == 0, err
    assert (log / "srun.signal").read_text().strip() == "TERM"
    assert (log / "scontrol.args").read_text().strip() == "requeue 4242"
    assert "time limit near" in out
