"""Layer 2 (distributed): Process-group set-up for torchrun, SLURM srun, mpiexec, or a single process.

`init_distributed()` returns a DistContext; every other module takes that object and never
reads launcher environment variables itself. The same command works under every launcher:

    torchrun --nproc_per_node 2 -m lungbench bench ...        # RANK, WORLD_SIZE, MASTER_*
    srun --ntasks-per-node 4 python -m lungbench bench ...    # SLURM_PROCID, SLURM_NTASKS, ...
    mpiexec -n 2 python -m lungbench bench ...                # mpi4py: rank, size, shared split
    python -m lungbench bench ...                             # one process, no group

Which launcher started us is decided from the environment, in this order (the first match
wins; LUNGBENCH_LAUNCHER=torchrun|mpi|slurm|none overrides it):
  1. torchrun: RANK and WORLD_SIZE are set;
  2. MPI: OMPI_COMM_WORLD_SIZE (Open MPI), MV2_COMM_WORLD_SIZE (MVAPICH), or PMI_SIZE with
     MPI_LOCALNRANKS (MPICH / Intel MPI hydra) or without any SLURM_PROCID. It comes before
     SLURM because `mpirun` inside an allocation starts its ranks through srun, whose SLURM_*
     variables then describe the daemons, not the ranks;
  3. SLURM: SLURM_PROCID and SLURM_NTASKS (SLURM_STEP_NUM_TASKS when srun set it);
  4. none: a single process.

Failure behaviour: every collective of the process group gives up after `timeout_s`, and a
watchdog ends a rendezvous that has not completed within `timeout_s` with one line on stderr,
so a rank that never starts, dies or hangs ends the job within bounded time.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import re
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch

from lungbench.core.console import quiet_unless_main
from lungbench.core.environment import allowed_cores
from lungbench.core.errors import LungbenchError, UsageError, look_up_option, message_of
from lungbench.distributed.launch import LaunchInfo, resolve_launch

DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for Gloo and NCCL collectives


# Exit status of a job ended by the rendezvous watchdog.
WATCHDOG_EXIT_CODE = 3


class DistributedError(LungbenchError):
    """A rank died, hung, or never joined: the job ends with this one-line message."""

    exit_code = 3


# Set when a collective failed because a peer died or hung: the process group's C++ threads
# may still be blocked on that peer, so it must not be destroyed or left to the interpreter's
# exit (both can block, or abort with "terminate called without an active exception").
_group_broken = False
# Set once this process joined a process group (world size > 1): it then ends through
# exit_now (lungbench.cli.leave_after_group).
_group_joined = False


def group_is_broken() -> bool:
    """True once a collective of this process failed for a lost peer (see exit_now)."""
    return _group_broken


def group_joined() -> bool:
    """True once this process joined a process group of more than one rank."""
    return _group_joined


def exit_now(code: int) -> NoReturn:
    """End this process with `code` without running destructors: flush the streams, then
    os._exit. How a process that joined a process group ends (broken or not: torch's
    threads can abort or block the interpreter's teardown); records and run.json are
    already on disk (written and fsynced as they were made)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. A single process has world_size 1, rank 0."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "none"  # "nccl", "gloo" or "none" for a single process
    launcher: str = "none"  # "torchrun", "slurm", "mpi" or "none"
    nodes: int = 1
    local_world_size: int = 1
    master: str = ""  # "host:port" of the rendezvous ("" for a single process)
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        """Only rank 0 prints and writes results."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary, saved with results."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "local_rank": self.local_rank,
            "local_world_size": self.local_world_size,
            "nodes": self.nodes,
            "device": str(self.device),
            "backend": self.backend,
            "launcher": self.launcher,
            "master": self.master,
            "timeout_s": self.timeout_s,
        }


def single_process(device: str | torch.device = "cpu") -> DistContext:
    """The context of a plain, launcher-free run on `device`."""
    return DistContext(device=torch.device(device))


def choose_device(device: str | torch.device, local_rank: int) -> torch.device:
    """'auto' -> cuda:<local rank> when CUDA is available, else cpu; 'cuda' -> cuda:<local
    rank>; 'cpu' and 'cuda:N' as given. UsageError when the GPU is not there."""
    text = str(device)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(text)
    except RuntimeError:
        raise UsageError(f"device {text!r}: choose from: auto, cpu, cuda, cuda:N") from None
    if chosen.type == "cpu":
        return chosen
    if chosen.type != "cuda":
        raise UsageError(f"device {text!r}: choose from: auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise UsageError(f"device {text}: no CUDA device on this machine; choose from: cpu")
    index = chosen.index if chosen.index is not None else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise UsageError(
            f"local rank {local_rank} needs cuda:{index} but only {count} GPU(s) "
            "are visible; start at most one process per GPU on each node"
        )
    return torch.device("cuda", index)


def init_distributed(
    device: str | torch.device = "auto",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    backend: str | None = None,
    env: Mapping[str, str] | None = None,
) -> DistContext:
    """Join the job's process group (if the launcher started more than one process).

    Args:
        device: 'auto' (cuda:<local rank> if CUDA is available, else cpu), 'cpu', 'cuda'.
        timeout_s: how long a collective (and the rendezvous) may wait for another rank
            before the job ends with a DistributedError (or, for the rendezvous, the watchdog).
        backend: 'nccl' or 'gloo'; default NCCL on CUDA, Gloo otherwise.
        env: the environment to read (default os.environ).
    Returns the DistContext; a single process gets world_size 1 and no process group.
    """
    if not timeout_s > 0:
        raise UsageError(f"--dist-timeout must be > 0 seconds, got {timeout_s}")
    env = os.environ if env is None else env
    info = resolve_launch(env)
    dev = choose_device(device, info.local_rank)
    if info.world_size <= 1:
        return DistContext(device=dev, launcher=info.launcher, timeout_s=timeout_s)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    backend = look_up_option(backend, ("nccl", "gloo"), what="backend")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL and *_object collectives use the current device
    master = f"{info.master_addr}:{info.master_port}"
    with rendezvous_watchdog(info, master, timeout_s):
        _join(info, backend, dev, timeout_s, master)
    global _group_joined
    _group_joined = True
    quiet_unless_main(info.rank == 0)  # rank 0 alone reports progress
    return DistContext(
        rank=info.rank,
        world_size=info.world_size,
        local_rank=info.local_rank,
        device=dev,
        backend=backend,
        launcher=info.launcher,
        nodes=info.nodes,
        local_world_size=info.local_world_size,
        master=master,
        timeout_s=timeout_s,
    )


def _join(
    info: LaunchInfo, backend: str, device: torch.device, timeout_s: float, master: str
) -> None:
    import torch.distributed as tdist

    if info.launcher != "torchrun":
        # Publish torch's env:// variables, so libraries that read them agree with us.
        os.environ.update(
            MASTER_ADDR=str(info.master_addr),
            MASTER_PORT=str(info.master_port),
            RANK=str(info.rank),
            WORLD_SIZE=str(info.world_size),
            LOCAL_RANK=str(info.local_rank),
        )
    try:
        tdist.init_process_group(
            backend,
            init_method="env://",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"rank {info.rank} of {info.world_size} ({info.launcher}): rendezvous at {master} "
            f"did not complete within {timeout_s:g} s: {_first_line(exc)}; check that every "
            "rank started and the master address is reachable"
        ) from None


@contextlib.contextmanager
def rendezvous_watchdog(info: LaunchInfo, master: str, timeout_s: float) -> Iterator[None]:
    """End the process with one line on stderr if the block has not finished within
    `timeout_s` (plus a little grace, so torch's own timeout error, when it comes, wins)."""

    def expire() -> None:
        print(
            f"lungbench: error: rank {info.rank} of {info.world_size} ({info.launcher}): "
            f"rendezvous at {master} did not complete within {timeout_s:g} s; check that "
            "every rank started and the master address is reachable",
            file=sys.stderr,
            flush=True,
        )
        os._exit(WATCHDOG_EXIT_CODE)  # note: a thread cannot interrupt a blocked C++ call

    timer = threading.Timer(timeout_s * 1.1 + 2.0, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@contextlib.contextmanager
def collective_guard(dist: DistContext, what: str) -> Iterator[None]:
    """Turn a failed collective (a rank died, hung past the timeout, or the connection
    broke) into a one-line DistributedError naming this rank and what it was doing."""
    import torch.distributed as tdist

    global _group_broken
    try:
        yield
    except tdist.DistError as exc:
        _group_broken = True
        raise DistributedError(_lost_rank_message(dist, what, exc)) from None
    except RuntimeError as exc:
        text = str(exc).lower()
        if any(
            k in text
            for k in (
                "gloo",
                "nccl",
                "connection",
                "timed out",
                "timeout",
                "peer",
                "socket",
                "store",
            )
        ):
            _group_broken = True
            raise DistributedError(_lost_rank_message(dist, what, exc)) from None
        raise


def _lost_rank_message(dist: DistContext, what: str, exc: BaseException) -> str:
    return (
        f"rank {dist.rank} of {dist.world_size} ({dist.launcher}, {dist.backend}): "
        f"{what} failed: another rank died or did not answer within {dist.timeout_s:g} s "
        f"({_first_line(exc)[:200]})"
    )


def _first_line(exc: BaseException) -> str:
    """The one line of the message without the C++ source location torch puts in front
    ("[/path/gloo/transport/tcp/pair.cc:537] Read error ...")."""
    text = message_of(exc)
    return re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", text).rstrip(".")


def gather_records(dist: DistContext, record: Any, what: str = "gathering results") -> list | None:
    """Every rank's `record` as a list on rank 0 (rank order); None on the other ranks.
    A single process gets [record]."""
    if not dist.is_distributed:
        return [record]
    import torch.distributed as tdist

    gathered: list | None = [None] * dist.world_size if dist.is_main else None
    with collective_guard(dist, what):
        tdist.gather_object(record, gathered, dst=0)
    return gathered


def all_gather(dist: DistContext, value: Any, what: str = "exchanging values") -> list:
    """Every rank's `value` on every rank (rank order)."""
    if not dist.is_distributed:
        return [value]
    import torch.distributed as tdist

    gathered: list = [None] * dist.world_size
    with collective_guard(dist, what):
        tdist.all_gather_object(gathered, value)
    return gathered


def barrier(dist: DistContext, what: str = "waiting for the other ranks") -> None:
    """Wait for every rank (no-op for a single process)."""
    if not dist.is_distributed:
        return
    import torch.distributed as tdist

    with collective_guard(dist, what):
        if dist.backend == "nccl":
            tdist.barrier(device_ids=[dist.device.index])
        else:
            tdist.barrier()


def rank0_print(dist: DistContext, *args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only."""
    if dist.is_main:
        print(*args, **kwargs)


def shutdown(dist: DistContext, finished: bool = False) -> None:
    """Leave the process group (no-op for a single process or when it never formed).

    `finished`: every rank got here by the same, successful path, so first wait for the
    others: a rank that tears its Gloo group down while a peer still works on it can abort
    ("terminate called without an active exception": rank 1 of a CI run, once)."""
    if not dist.is_distributed:
        return
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()) or _group_broken:
        return
    if finished:
        try:
            barrier(dist, "waiting for the other ranks to finish")
        except DistributedError:
            return  # a peer is gone: the group is broken, leave it alone (exit_now)
    tdist.destroy_process_group()
    gc.collect()  # drop DDP reducers and work objects still holding the group, now


@contextlib.contextmanager
def group_session(dist: DistContext) -> Iterator[None]:
    """Run a command's work in the process group, then leave it: after a barrier when the
    work succeeded on this rank, at once when it raised (the other ranks' collectives then
    fail with a lost-peer error instead of waiting for a barrier that never matches)."""
    try:
        yield
    except BaseException:
        shutdown(dist)
        raise
    shutdown(dist, finished=True)


def wrap_model(
    model: torch.nn.Module, dist: DistContext, bucket_cap_mb: float | None = None
) -> torch.nn.Module:
    """`model` on this rank's device, in DistributedDataParallel when the job has several
    processes (DDP broadcasts rank 0's weights, so every rank starts from the same ones).
    `bucket_cap_mb`: DDP's gradient bucket size (None: torch's default, 25 MB)."""
    model = model.to(dist.device)
    if not dist.is_distributed:
        return model
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    kwargs = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, **kwargs)


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal on two ranks iff the weights are identical."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def threads_per_rank(dist: DistContext) -> int:
    """CPU cores this process may use without oversubscribing its node: the cores it is
    allowed to run on, shared among the ranks on the same node."""
    cores = allowed_cores()
    # Ranks bound to their own cores (srun --cpus-per-task, mpiexec -bind-to) already see
    # only their share; ranks that see the whole node divide it.
    node_cores = os.cpu_count() or cores
    if cores < node_cores:
        return max(1, cores)
    return max(1, cores // max(1, dist.local_world_size))
