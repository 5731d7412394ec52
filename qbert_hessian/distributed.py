"""The world of a ``torch.distributed`` job: who this process is, and the few collectives the stages need.

``torchrun --nproc-per-node N -m qbert_hessian ...`` and ``accelerate launch -m qbert_hessian ...`` start N
copies of the CLI with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. :func:`world_from_env` reads them (a :class:`World` of size 1 when they are absent) and
refuses an inconsistent set; :func:`start` joins the process group, gloo on CPUs, NCCL on GPUs, one GPU per
local rank.

The helpers below act on the default process group that :func:`start` (or the HF Trainer) created, and are
no-ops in a single process, so library code calls them unconditionally:

- :func:`all_reduce_` sums a list of tensors in place through one flat buffer (one collective per call: a
  data-parallel Hessian-vector product is the local sum followed by this);
- :func:`all_reduce_floats` and :func:`all_gather_objects` / :func:`broadcast_object` for the small things
  (loss sums, embedding rows, finished blocks, grid points, cache decisions);
- :func:`rank`, :func:`world_size`, :func:`is_main`, :func:`barrier`, :func:`shard`.

Only the main rank (rank 0) writes artifacts; the others wait at a :func:`barrier` when they need its files.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import QBHError

T = TypeVar("T")
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_HINT = "launch with torchrun --nproc-per-node N -m qbert_hessian ... (or accelerate launch), which sets them"


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the job: global ``rank`` of ``size``, ``local_rank`` of ``local_size`` on its host."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes artifacts, logs and draws progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(environ: Mapping[str, str], key: str) -> int | None:
    value = environ.get(key)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise QBHError(f"{key}={value!r} is not an integer; {LAUNCH_HINT}") from None


def world_from_env(environ: Mapping[str, str] | None = None) -> World:
    """The :class:`World` that torchrun / accelerate describe in the environment (size 1 when not launched).

    ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` default to ``RANK`` and ``WORLD_SIZE`` (one host).

    Raises:
        QBHError: ``WORLD_SIZE`` > 1 without ``RANK``, ``MASTER_ADDR`` or ``MASTER_PORT``, or a rank outside
            the world.
    """
    env = os.environ if environ is None else environ
    size = _env_int(env, "WORLD_SIZE")
    if size is None or size == 1:
        return World()
    if size < 1:
        raise QBHError(f"WORLD_SIZE={size} must be at least 1; {LAUNCH_HINT}")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k, "").strip()]
    if missing:
        names = ", ".join(missing[:-1]) + (" and " if len(missing) > 1 else "") + missing[-1]
        raise QBHError(f"WORLD_SIZE={size} is set but {names} {'are' if len(missing) > 1 else 'is'} not; {LAUNCH_HINT}")
    rank = _env_int(env, "RANK")
    local_rank = _env_int(env, "LOCAL_RANK")
    local_size = _env_int(env, "LOCAL_WORLD_SIZE")
    local_rank = rank if local_rank is None else local_rank
    local_size = size if local_size is None else local_size
    assert rank is not None
    if not 0 <= rank < size:
        raise QBHError(f"RANK={rank} lies outside WORLD_SIZE={size} (ranks are 0..{size - 1}); {LAUNCH_HINT}")
    if not 0 <= local_rank < local_size <= size:
        raise QBHError(
            f"LOCAL_RANK={local_rank} with LOCAL_WORLD_SIZE={local_size} does not fit WORLD_SIZE={size}; {LAUNCH_HINT}"
        )
    return World(rank, size, local_rank, local_size)


def backend_for(device: str) -> str:
    """The collective backend for a device: NCCL for CUDA, gloo for CPUs."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def check_world(world: World, device: str) -> str:
    """The device this rank uses (``cuda`` -> ``cuda:<local rank>``), after checking the job can run on it.

    Raises:
        QBHError: the backend is not built into this torch, or fewer GPUs than local ranks.
    """
    if not world.distributed:
        return device
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = device
    if kind not in ("cpu", "cuda"):
        raise QBHError(f"--device {device} cannot run distributed; use cpu (gloo) or cuda (NCCL)")
    if kind == "cuda":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < world.local_size:
            raise QBHError(
                f"{world.local_size} processes on this host need a GPU each but {gpus} are visible; "
                + (f"use --nproc-per-node {gpus} or fewer, or --device cpu" if gpus else "use --device cpu")
            )
    backend = backend_for(device)
    if not dist.is_available() or not (dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available()):
        raise QBHError(
            f"the {backend} backend is not available in this torch build; "
            + ("install a CUDA build of torch" if backend == "nccl" else "use --device cuda or a torch build with gloo")
        )
    return f"cuda:{world.local_rank}" if kind == "cuda" else device


def start(world: World, device: str, *, timeout_s: float = 1800.0, connect_timeout_s: float = 300.0) -> bool:
    """Join the default process group of ``world``; whether this call created it (False for one process or a
    group that exists already).

    A process other than rank 0 first reaches the rendezvous store at ``MASTER_ADDR:MASTER_PORT`` (rank 0's, or
    the launcher's) within ``connect_timeout_s``: a process started alone, without the rest of its group, says
    so instead of waiting out ``timeout_s``.

    Raises:
        QBHError: the rendezvous store could not be reached in time.
    """
    if not world.distributed or dist.is_initialized():
        return False
    if world.rank != 0:
        _reach_store(world, connect_timeout_s)
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(
        backend=backend,
        rank=world.rank,
        world_size=world.size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return True


def _reach_store(world: World, timeout_s: float) -> None:
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    saved = os.dup(2)  # c10d prints each failed try, with a C++ stack, straight to stderr: one line says it all
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            dist.TCPStore(addr, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, OSError):  # DistStoreError (a RuntimeError) when it times out
        raise QBHError(
            f"process RANK={world.rank} of WORLD_SIZE={world.size} found no rendezvous at {addr}:{port} within "
            f"{timeout_s:g} s: rank 0 is not running; start every process together ({LAUNCH_HINT.split(', ')[0]})"
        ) from None
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def stop() -> None:
    """Leave the default process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ the running group


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """The number of processes (1 outside a process group)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Whether this process writes artifacts: rank 0, or the only process."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a file the others read)."""
    if _active():
        dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``world_size()``-th item from its rank (all of them alone)."""
    return list(items[rank() :: world_size()])


def _collective_device() -> torch.device:
    """Where tensors must live for the backend: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _flat_collective_(tensors: Sequence[Tensor], collective: Callable[[Tensor], Any]) -> list[Tensor]:
    """Run ``collective`` in place on one flat buffer per dtype of ``tensors`` and copy the result back into
    them (so one collective per call in the usual all-fp32 case); returns them."""
    tensors = list(tensors)
    if not _active() or not tensors:
        return tensors
    device = _collective_device()
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in group]).to(device)
        collective(flat)
        offset = 0
        with torch.no_grad():
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
    return tensors


def all_reduce_(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Sum ``tensors`` over ranks in place, through one flat buffer per dtype; returns them."""
    return _flat_collective_(tensors, dist.all_reduce)


def all_reduce_floats(values: Sequence[float], op: str = "sum") -> list[float]:
    """``values`` summed (``op="sum"``) or maximised (``op="max"``) over ranks, in float64."""
    if not _active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_reduce_max_(t: Tensor) -> Tensor:
    """``t`` replaced in place by its element-wise maximum over ranks."""
    if _active():
        buf = t.detach().to(_collective_device())
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        t.copy_(buf)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_(tensors: Sequence[Tensor], src: int = 0) -> list[Tensor]:
    """Overwrite ``tensors`` in place with rank ``src``'s values (one flat buffer per dtype)."""
    return _flat_collective_(tensors, lambda flat: dist.broadcast(flat, src=src))
    device = _collective_device()
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in group]).to(device)
        dist.broadcast(flat, src=src)
        offset = 0
        for t in group:
            with torch.no_grad():
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    return tensors
