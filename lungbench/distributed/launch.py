"""Layer 2 (distributed): how this process was launched (torchrun, srun, mpiexec, or alone).

Reads the launcher's environment into a LaunchInfo (rank, world size, local rank, nodes,
rendezvous address); lungbench.distributed.group then joins the process group.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import hostlist

from lungbench.core.errors import UsageError, look_up_option

LAUNCHERS = ("torchrun", "mpi", "slurm", "none")


# Ports derived from a SLURM job id fall in 10000-29999: below Linux's ephemeral range
# (32768-60999), so they do not collide with client sockets.
SLURM_PORT_BASE = 10000


SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class LaunchInfo:
    """What the launcher's environment says, before any process group exists."""

    launcher: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    nodes: int = 1
    master_addr: str | None = None
    master_port: int | None = None


def parse_nodelist(text: str) -> list[str]:
    """Expand a SLURM host list: "node[01-03,07]" -> node01 node02 node03 node07,
    "a1,b[2-3]" -> a1 b2 b3, "r[1-2]-n[1-2]" -> r1-n1 r1-n2 r2-n1 r2-n2. Zero padding is kept.

    The same expansion `scontrol show hostnames` does (scontrol is not on every node), by
    python-hostlist (the expander of NSC's SLURM tools). Raises ValueError naming the list
    on unbalanced brackets or a bad range.
    """
    try:
        return list(hostlist.expand_hostlist(text.strip()))
    except hostlist.BadHostlist as exc:
        raise ValueError(f"node list {text!r}: {exc}") from None


def slurm_port(job_id: str | int | None) -> int:
    """The rendezvous port of a SLURM job: every rank derives the same one from the job id,
    and two jobs sharing a node get different ones."""
    digits = re.sub(r"\D", "", str(job_id or ""))
    return SLURM_PORT_BASE + (int(digits) % SLURM_PORT_SPAN if digits else 0)


def detect_launcher(env: Mapping[str, str]) -> str:
    """'torchrun', 'mpi', 'slurm' or 'none' (order and override: see the module docstring)."""
    forced = env.get("LUNGBENCH_LAUNCHER")
    if forced:
        return look_up_option(forced, LAUNCHERS, what="LUNGBENCH_LAUNCHER")
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if (
        "OMPI_COMM_WORLD_SIZE" in env
        or "MV2_COMM_WORLD_SIZE" in env
        or ("PMI_SIZE" in env and ("MPI_LOCALNRANKS" in env or "SLURM_PROCID" not in env))
    ):
        return "mpi"
    if "SLURM_PROCID" in env and ("SLURM_NTASKS" in env or "SLURM_STEP_NUM_TASKS" in env):
        return "slurm"
    return "none"


def torchrun_launch(env: Mapping[str, str]) -> LaunchInfo:
    """torchrun (or any launcher that sets torch's env:// variables)."""
    world = _int(env, "WORLD_SIZE")
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    nodes = int(env.get("GROUP_WORLD_SIZE", -(-world // max(1, local_world))))
    return LaunchInfo(
        "torchrun",
        rank=_int(env, "RANK"),
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=local_world,
        nodes=nodes,
        master_addr=env.get("MASTER_ADDR"),
        master_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None,
    )


def slurm_launch(env: Mapping[str, str]) -> LaunchInfo:
    """srun: ranks from SLURM_*, master = first host of the step's (else the job's) node list,
    port = MASTER_PORT if set, else derived from the job id."""
    world = int(env.get("SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS"))
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    nodelist = (
        env.get("SLURM_STEP_NODELIST")
        or env.get("SLURM_JOB_NODELIST")
        or env.get("SLURM_NODELIST")
        or ""
    )
    addr = env.get("MASTER_ADDR")
    if not addr:
        try:
            hosts = parse_nodelist(nodelist)
        except ValueError as exc:
            raise UsageError(f"SLURM_JOB_NODELIST: {exc}") from None
        addr = hosts[0] if hosts else "127.0.0.1"
    port = (
        int(env["MASTER_PORT"])
        if env.get("MASTER_PORT")
        else slurm_port(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"))
    )
    local_world = -(-world // max(1, nodes))
    tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if tasks_per_node and re.fullmatch(r"\d+", tasks_per_node.split("(")[0]):
        local_world = int(tasks_per_node.split("(")[0])
    return LaunchInfo(
        "slurm",
        rank=_int(env, "SLURM_PROCID"),
        world_size=world,
        local_rank=int(env.get("SLURM_LOCALID", 0)),
        local_world_size=local_world,
        nodes=nodes,
        master_addr=addr,
        master_port=port,
    )


def mpi_launch(env: Mapping[str, str]) -> LaunchInfo:
    """mpiexec / mpirun through mpi4py: rank and size of COMM_WORLD, node-local rank from a
    shared-memory split, rank 0's address and a free port broadcast to everyone."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise UsageError(
            "started by an MPI launcher, but mpi4py is not installed; "
            "pip install 'lungbench[mpi]' or launch with torchrun/srun"
        ) from None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_world = local.Get_rank(), local.Get_size()
    nodes = comm.allreduce(1 if local_rank == 0 else 0)
    local.Free()
    master = None
    if rank == 0:
        # One node: loopback always works. Several: the host name, which the other nodes
        # resolve (MASTER_ADDR overrides both, e.g. to pick the fast interconnect).
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if nodes == 1 else socket.getfqdn())
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else free_port()
        master = (addr, port)
    addr, port = comm.bcast(master, root=0)
    return LaunchInfo(
        "mpi",
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        nodes=nodes,
        master_addr=addr,
        master_port=port,
    )


def finalize_mpi() -> None:
    """MPI_Finalize, when this process initialized MPI (an mpiexec launch) and has not yet:
    a process that leaves through os._exit must do it itself, or mpiexec drops the output it
    had not yet forwarded (rank 0's results line went missing)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()


def resolve_launch(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """What the environment says about this process (no process group is created)."""
    env = os.environ if env is None else env
    launcher = detect_launcher(env)
    try:
        if launcher == "torchrun":
            return torchrun_launch(env)
        if launcher == "slurm":
            return slurm_launch(env)
        if launcher == "mpi":
            return mpi_launch(env)
    except (KeyError, ValueError) as exc:
        raise UsageError(f"{launcher} environment: {exc}") from None
    return LaunchInfo("none")


def require_single_process(what: str, hint: str = "") -> None:
    """UsageError when a multi-process launcher started this process: `what` measures or
    trains in one process, and N copies would write N run folders (or race for one)."""
    launch = resolve_launch()
    if launch.world_size > 1:
        raise UsageError(
            f"{what}: runs in one process; {launch.launcher} started {launch.world_size}. "
            f"Run it without torchrun/srun/mpiexec (or with one task){hint}"
        )


def free_port() -> int:
    """A TCP port free right now on this host (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _int(env: Mapping[str, str], name: str) -> int:
    if name not in env:
        raise KeyError(f"{name} is not set")
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer") from None
