"""Training on several processes: ``torchrun`` and DistributedDataParallel.

``torchrun --nproc_per_node=N -m cae.cli train ...`` starts N copies of ``cae train``; each reads
its rank from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), joins the
process group (gloo on the CPU, NCCL on CUDA) and trains on its own share of the chunks, the same
epoch seed everywhere. Gradients are averaged by DistributedDataParallel; metric sums are added
across ranks before they are read; only rank 0 writes checkpoints, MLflow and TensorBoard.

Every rank takes the same number of steps per epoch (the fewest any rank's chunks allow, computed
from the chunk sizes every rank knows), so no rank waits for a collective another never starts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cae.errors import ConfigError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and tracks the run."""
        return self.rank == 0


def ranks_from_environment() -> Ranks:
    """The ranks torchrun set in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``);
    one process when they are absent.

    Raises:
        ConfigError: the variables are malformed.
    """
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them); unset them "
            "to train in one process"
        ) from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} is not within WORLD_SIZE={world_size}")
    return Ranks(rank, world_size, local_rank)


def start(ranks: Ranks, device: torch.device) -> torch.device:
    """Join the process group (gloo for the CPU, NCCL for CUDA) unless already joined.

    Args:
        ranks: this process's ranks (``enabled``).
        device: the training device; CUDA becomes ``cuda:LOCAL_RANK``.

    Returns:
        The device this rank trains on.
    """
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size)
    return device


def stop() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Add every tensor in place across ranks (a no-op in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
