"""Data-parallel training under ``torchrun`` (DistributedDataParallel).

``torchrun --standalone --nproc_per_node N -m bloodcell train ...`` starts N copies of
the same command; torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) tells each
which one it is. Every step takes the same global batch as one process would
(``--batch-size``), each rank computing its slice; DDP averages the gradients, so the
update is the one-process update up to BatchNorm statistics, which each rank takes
over its own slice. Rank 0 alone writes checkpoints, logs and the model.
One process (no torchrun) is the world of size 1: every helper here is then a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def from_env() -> World:
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def start(world: World) -> torch.device | None:
    """Join the process group (nccl on CUDA, gloo on CPU); -> this rank's device."""
    if not world.distributed:
        return None
    import torch.distributed as dist
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", world.local_rank) if cuda else torch.device("cpu")


def stop(world: World) -> None:
    if world.distributed:
        import gc
        import torch.distributed as dist
        # DDP's reducer and gloo's pending work must go while the group still exists: freed
        # later, at interpreter exit, a gloo thread can abort the process (SIGABRT)
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist
        dist.barrier()


def shard(idx, world: World):
    """This rank's slice of a global batch (every rank gets one, as even as possible)."""
    return idx[world.rank::world.size]


def wrap(model: torch.nn.Module, world: World, device) -> torch.nn.Module:
    """The module the training step calls: DDP over ``model`` (rank 0's weights are
    broadcast to all), or the model itself in one process."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def total(values: list[float], world: World, device) -> list[float]:
    """Sums over the ranks (loss sums, correct counts, seen counts, a stop flag)."""
    if not world.distributed:
        return values
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
