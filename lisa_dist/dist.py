"""torch.distributed start-up from whatever launched us, and the checks that keep ranks in step.

Launchers, in the order they are recognized:
- torchrun / the deepspeed launcher / any env:// launcher: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (LOCAL_RANK).
- MPI (mpirun, srun --mpi=pmix|pmi2): rank and size from mpi4py's COMM_WORLD, the local rank from a shared-memory
  split; rank 0 picks a free port and its address (unless MASTER_PORT / MASTER_ADDR are set) and broadcasts both.
- SLURM tasks without PMI (plain srun): SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID; MASTER_ADDR/PORT when
  set, else the first host of the job's node list and a port derived from the job id.
- nothing: one process (a distributed backend then runs as a group of one).
nccl on GPUs, gloo on CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lisa_dist.errors import CollectiveFailure, ConfigError, DistError, first_line
from lisa_dist.teardown import guard_exit, wait_for_idle_gloo_workers

T = TypeVar("T")

ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str


@dataclass(frozen=True)
class Placement:
    """Where this process sits, before any process group exists."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def detect_launcher(env: Mapping[str, str] = os.environ) -> str:
    """env (torchrun, deepspeed, ...), mpi, slurm or single."""
    # RANK / WORLD_SIZE are per-process launcher output; MASTER_ADDR / MASTER_PORT alone are often exported by
    # users or batch scripts for the MPI and SLURM paths, which honour them.
    if "RANK" in env or "WORLD_SIZE" in env:
        return "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
    if any(name in env for name in MPI_VARS):
        return "mpi"
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:  # a task of an srun step, not the batch shell
        return "slurm"
    return "single"


RANK_HINTS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def rank_hint(env: Mapping[str, str] = os.environ) -> int:
    """This process's rank as the launcher announced it, before any process group exists (0 when alone)."""
    for name in RANK_HINTS:
        if env.get(name, "").isdigit():
            return int(env[name])
    return 0


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise DistError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise DistError(f"environment variable {name}={value!r} is not an integer") from None


def _check(rank: int, world: int, local_rank: int, names: tuple[str, str, str]) -> None:
    if world < 1:
        raise DistError(f"{names[1]}={world} must be >= 1")
    if not 0 <= rank < world:
        raise DistError(f"{names[0]}={rank} is not in 0..{names[1]}-1={world - 1}")
    if local_rank < 0:
        raise DistError(f"{names[2]}={local_rank} must be >= 0")


def placement_from_env(env: Mapping[str, str]) -> Placement:
    """torchrun and friends: every variable must be there and consistent."""
    missing = [name for name in ENV_VARS if not env.get(name)]
    if missing:
        present = [name for name in ENV_VARS if env.get(name)]
        raise DistError(
            f"{', '.join(present)} set but {', '.join(missing)} not: the launcher's environment is "
            "incomplete (torchrun sets all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
        )
    rank, world, local = _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", 0)
    _check(rank, world, local, ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    port = _int(env, "MASTER_PORT")
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
    return Placement(rank, world, local, env["MASTER_ADDR"], port, launcher)


def placement_from_slurm(env: Mapping[str, str]) -> Placement:
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
    local = _int(env, "SLURM_LOCALID", 0)
    _check(rank, world, local, ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"))
    addr = env.get("MASTER_ADDR") or first_slurm_host(env)
    # Every task derives the same port from the job id, without talking to the others.
    port = _int(env, "MASTER_PORT", 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000)
    return Placement(rank, world, local, addr, port, "slurm")


def first_slurm_host(env: Mapping[str, str]) -> str:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise DistError("SLURM_PROCID is set but neither SLURM_JOB_NODELIST nor MASTER_ADDR is")
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise DistError(
            f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol ({exc}); set MASTER_ADDR"
        ) from None
    return out.split()[0]


def placement_from_mpi(env: Mapping[str, str]) -> Placement:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        if comm.Get_rank() == 0:
            # A port the OS says is free, never a fixed 29500 that a second job on the node would also take.
            addr = env.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
            chosen = (addr, int(env.get("MASTER_PORT") or _free_port()))
        else:
            chosen = None
        addr, port = comm.bcast(chosen, root=0)
        return Placement(comm.Get_rank(), comm.Get_size(), local.Get_rank(), addr, port, "mpi")
    finally:
        local.Free()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def discover(env: Mapping[str, str] = os.environ) -> Placement:
    launcher = detect_launcher(env)
    if launcher in ("torchrun", "env"):
        return placement_from_env(env)
    if launcher == "mpi":
        return placement_from_mpi(env)
    if launcher == "slurm":
        return placement_from_slurm(env)
    return Placement(0, 1, 0, "127.0.0.1", _free_port(), "single")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`train.device` (auto, cpu, cuda) as this rank's device; ConfigError for cuda without a GPU, or for a local
    rank past the GPUs this process sees. A process that sees one GPU uses it whatever its local rank: a scheduler
    that gives each task its own GPU (`srun --gpus-per-task=1`, a per-rank CUDA_VISIBLE_DEVICES) shows it as 0."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device='cuda' but torch sees no CUDA device (a CPU build of torch, or no GPU on "
            "this node): use train.device=auto or cpu"
        )
    if not (name == "cuda" or (name == "auto" and torch.cuda.is_available())):
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if local_rank < visible:
        return torch.device("cuda", local_rank)
    if visible == 1:
        return torch.device("cuda", 0)
    raise ConfigError(
        f"local rank {local_rank} has no GPU of its own: this process sees {visible} GPUs "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}, LOCAL_RANK="
        f"{os.environ.get('LOCAL_RANK', '<unset>')!r}, SLURM_LOCALID="
        f"{os.environ.get('SLURM_LOCALID', '<unset>')!r}): start one rank per GPU of the node "
        "(NPROC_PER_NODE), or give each task one GPU (srun --gpus-per-task=1)"
    )


def init_distributed(device: str = "auto", timeout_s: float = 300.0, io_timeout_s: float = 3600.0) -> DistEnv:
    """Join (or start) the process group the launcher describes; idempotent. `timeout_s` bounds every collective
    of the training steps, so a rank waiting on a dead peer fails instead of hanging; `io_timeout_s` bounds the
    waits on one rank's I/O (`io_group`)."""
    place = discover()
    dev = resolve_device(device, place.local_rank)
    guard_exit()
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # Later libraries (DeepSpeed) read the same variables.
        os.environ.update(
            RANK=str(place.rank),
            WORLD_SIZE=str(place.world_size),
            LOCAL_RANK=str(place.local_rank),
            MASTER_ADDR=place.master_addr,
            MASTER_PORT=str(place.master_port),
        )
        backend, timeout = "nccl" if use_cuda else "gloo", timedelta(seconds=timeout_s)
        # NCCL bound to this rank's GPU at init: communicators are made eagerly on the right device, not guessed
        # from the current device at the first collective.
        extra: dict[str, Any] = {"device_id": dev} if use_cuda else {}
        if place.launcher in ("torchrun", "env"):
            # env:// joins the store the launcher's agent already serves.
            dist.init_process_group(
                backend, rank=place.rank, world_size=place.world_size, init_method="env://", timeout=timeout, **extra
            )
        else:
            # Rank 0 serves the store: kept here so that shutdown() can outlive every other rank's use of it.
            store = dist.TCPStore(
                place.master_addr, place.master_port, place.world_size, place.rank == 0, timeout=timeout
            )
            _OWN_STORE.update(store=store, rank=place.rank, world=place.world_size)
            dist.init_process_group(
                backend, store=store, rank=place.rank, world_size=place.world_size, timeout=timeout, **extra
            )
    if place.world_size > 1 and "group" not in _IO:
        # Waits on I/O (data preparation, checkpoints, exports) can outlast any step: their own CPU group, with
        # their own timeout. gloo, as torchtitan's checkpointer uses: no GPU memory, any tensor device.
        _IO["group"] = dist.new_group(backend="gloo", timeout=timedelta(seconds=io_timeout_s))
    return DistEnv(place.rank, place.world_size, place.local_rank, dev, place.launcher)


_IO: dict = {}


def io_group() -> dist.ProcessGroup | None:
    """The group for waits on one rank's I/O and for object collectives (None: the default group)."""
    return _IO.get("group")


def io_barrier() -> None:
    """A barrier that waits up to the I/O timeout (for a rank still writing a checkpoint or a cache)."""
    if dist.is_initialized():
        dist.barrier(group=io_group())


_OWN_STORE: dict = {}
CLOSED_KEY = "lisa_dist/closed"


def shutdown(wait_s: float = 30.0) -> None:
    """Leave the process group on every rank. When rank 0 serves the store itself (MPI, SLURM tasks), it waits
    until every rank has left before it goes: a rank whose store vanished under it aborts at exit."""
    if not dist.is_initialized():
        return
    io_barrier()
    if dist.get_backend() == "nccl":
        torch.cuda.synchronize()  # NCCL's work is asynchronous: none may be in flight when its communicators go
    dist.destroy_process_group()
    _IO.clear()
    wait_for_idle_gloo_workers()
    own = dict(_OWN_STORE)
    _OWN_STORE.clear()
    if not own:
        return
    left = own["store"].add(CLOSED_KEY, 1)
    deadline = time.monotonic() + wait_s
    while own["rank"] == 0 and left < own["world"] and time.monotonic() < deadline:
        time.sleep(0.05)
        left = own["store"].add(CLOSED_KEY, 0)


def rank_table() -> str:
    """`rank=host:pid` of every rank, so a launcher's report of a dead PID can be traced to its rank."""
    me = f"{socket.gethostname()}:{os.getpid()}"
    if not dist.is_initialized():
        return f"0={me}"
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, me, group=io_group())
    return ", ".join(f"{rank}={where}" for rank, where in enumerate(gathered))


def broadcast_seed(seed: int) -> int:
    """Rank 0's seed, on every rank (through mpi4py under MPI, torch.distributed otherwise)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return seed
    if detect_launcher() == "mpi":
        from mpi4py import MPI

        return MPI.COMM_WORLD.bcast(seed, root=0)
    box = [seed]
    dist.broadcast_object_list(box, src=0, group=io_group())
    return int(box[0])


def check_same_on_all_ranks(what: str, value: Sequence[int]) -> None:
    """All-gather a digest of `value`; if any rank differs, raise on every rank naming the ranks and their values."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    payload = json.dumps(list(value))
    digest = hashlib.sha256(payload.encode()).hexdigest()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (digest, payload), group=io_group())
    if len({d for d, _ in gathered}) > 1:
        groups: dict[str, list[int]] = {}
        for rank, (_, p) in enumerate(gathered):
            groups.setdefault(p, []).append(rank)
        detail = "; ".join(f"ranks {ranks}: {p}" for p, ranks in groups.items())
        raise DistError(f"ranks disagree on {what}: {detail} (different seeds or configs on different ranks?)")


def all_gather_objects(value: object) -> list:
    """`value` of every rank, in rank order (a list of one without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value, group=io_group())
    return gathered


def from_main(value: T) -> T:
    """The main rank's `value`, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=io_group())
    return box[0]


def raise_together(error: BaseException | None) -> None:
    """Collective: when any rank failed, every rank raises the lowest failing rank's error (its own when it failed
    itself), so that no rank goes on into a collective that the failed one will never join."""
    try:
        errors = all_gather_objects(error)
    except (TypeError, AttributeError, ValueError):  # an error that does not pickle travels as its text
        errors = all_gather_objects(None if error is None else RuntimeError(f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    first = next((found for found in errors if found is not None), None)
    if first is not None:
        raise first


def run_together(work: Callable[[], object], failures: tuple[type[BaseException], ...] = (Exception,)) -> None:
    """Collective: this rank's `work`, then `raise_together` with what it raised (of `failures`): a rank's own I/O
    between collectives ends in an agreement, never in a barrier that a rank which failed alone would not join."""
    error = None
    try:
        work()
    except failures as exc:
        error = exc
    raise_together(error)


PEER_PREFIX = "lisa_dist/peers"


class PeerReport:
    """Which ranks stopped answering, when a collective fails.

    Every rank records the step it starts in the job's store (one small write per step); a rank whose collective
    failed marks itself failed there and waits a little for the others to do the same. The ranks that neither
    failed nor finished are the ones that stopped answering: hung, stopped, or stuck in something else.
    """

    def __init__(self) -> None:
        self.store = _job_store()
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    def started(self, step: int) -> None:
        if self.store is None or self.world == 1:
            return
        try:
            self.store.set(f"{PEER_PREFIX}/step/{self.rank}", str(step))
        except (RuntimeError, dist.DistError):
            # The store's host is gone (torchrun's agent killed, say): training can go on without the report.
            self.store = None

    def silent_ranks(self, wait_s: float) -> dict[int, str] | None:
        """Ranks that did not also report a failure within `wait_s`, with the last step each started; None when
        the store cannot be reached (its host is gone)."""
        if self.store is None or self.world == 1:
            return None
        try:
            self.store.set_timeout(timedelta(seconds=max(1.0, wait_s)))
            self.store.set(f"{PEER_PREFIX}/failed/{self.rank}", "1")
            deadline = time.monotonic() + wait_s
            others = [r for r in range(self.world) if r != self.rank]
            silent = others
            while silent and time.monotonic() < deadline:
                silent = [r for r in silent if not self.store.check([f"{PEER_PREFIX}/failed/{r}"])]
                time.sleep(0.2)
            steps = {}
            for r in silent:
                key = f"{PEER_PREFIX}/step/{r}"
                steps[r] = self.store.get(key).decode() if self.store.check([key]) else "none"
            return steps
        except (RuntimeError, dist.DistError):
            return None


def _job_store() -> dist.Store | None:
    """The store this job's process group was built on (the launcher's, or rank 0's under MPI and SLURM)."""
    if _OWN_STORE:
        return _OWN_STORE["store"]
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()  # private: docs/internals.md
    except (AttributeError, RuntimeError, ValueError):
        return None


COMM_FAILURE_MARKS = (
    "Timed out",
    "timed out",
    "Connection closed by peer",
    "Connection reset",
    "Broken pipe",
    "NCCL",
    "gloo",
    "Gloo",
)


def is_collective_failure(exc: BaseException) -> bool:
    """An error raised by a collective of the transport (gloo and NCCL raise plain RuntimeErrors)."""
    if isinstance(exc, dist.DistError) and not isinstance(exc, DistError):
        return True
    return isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in COMM_FAILURE_MARKS)


def collective_failure(exc: BaseException, doing: str, timeout_s: float, peers: PeerReport | None) -> DistError:
    """One line for a failed collective: what this rank was doing, the timeout, the ranks that did not answer."""
    first = first_line(exc)
    first = first.split("] ", 1)[-1]  # gloo prefixes its source location
    silent = peers.silent_ranks(min(30.0, max(5.0, timeout_s / 10))) if peers else None
    if silent:
        who = ", ".join(f"rank {r} (last started step {s})" for r, s in sorted(silent.items()))
        answer = f"ranks that did not answer: {who}"
    elif silent is None:
        answer = "the job's store is unreachable too (its host, rank 0 or the launcher, is gone)"
    else:
        answer = "every other rank failed in the same way"
    return CollectiveFailure(
        f"a collective failed during {doing} (backend.timeout_s={timeout_s:g}): {answer}. The transport said: {first}"
    )
