"""Process-group set-up and the few collectives dsparse needs (model-agnostic: the
trainer, the sparsity methods and the sweep workers all use these).

One code path for every launcher: ``torchrun``, the ``deepspeed`` launcher and Ray Train
set ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; a plain ``dsparse train`` sets them for a
single process. The backend follows the device: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.distributed as dist


def device_and_backend() -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), "nccl"
    return torch.device("cpu"), "gloo"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Join (or create) the default process group; returns (rank, world_size, device)."""
    device, backend = device_and_backend()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain single-process run
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return dist.get_rank(), dist.get_world_size(), device


def trainer_threads(setting: int | str | None, loader_workers: int = 0) -> tuple[int, dict | None]:
    """Intra-op threads for this training process (``train.threads``) and, for ``auto``
    (or None), the budget they came from (``dsparse.cpus.CpuBudget.as_dict``): a number as
    given; ``torch``, torch's current setting. Every rank probes the cores' load at the
    same moment (after a barrier), so the ranks of a node do not count each other."""
    if setting == "torch":
        return torch.get_num_threads(), None
    if setting not in (None, "auto"):
        return int(setting), None
    from dsparse.cpus import cpu_budget

    barrier()
    budget = cpu_budget(loader_workers)
    return budget.threads, budget.as_dict()


@contextlib.contextmanager
def intra_op_threads(threads: int):
    """Run the block with ``threads`` intra-op threads, then restore the caller's setting
    (a library caller keeps its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum across ranks in place (no-op on one rank); returns the tensor."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value):
    """Rank 0's ``value`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(value) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def on_rank_0(function, *args, share: bool = True):
    """Run ``function`` on rank 0 alone and let every rank see the outcome: an exception
    there is raised on every rank as one ValueError (never a rank waiting alone in a
    collective). With ``share`` every rank gets the result, else only rank 0 (the others
    get None: e.g. a lock descriptor)."""
    result, problem = None, None
    if is_main():
        try:
            result = function(*args)
        except ValueError as error:
            problem = str(error)
        except Exception as error:  # OSError, a malformed file...: same on every rank
            problem = f"{type(error).__name__}: {error}"
    if share:
        result, problem = broadcast_object((result, problem))
    else:
        problem = broadcast_object(problem)
    if problem:
        raise ValueError(problem)
    return result
