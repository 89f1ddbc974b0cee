"""Data-parallel training under ``torchrun``: one process per device, gradients averaged by DDP.

``--batch-size`` stays the global batch: each of the N ranks trains on its 1/N share, drawn by a
DistributedSampler, so the same command gives the same optimisation problem on 1 or N processes
(BatchNorm statistics are per rank, as in any DDP run without SyncBatchNorm). Every rank evaluates
the whole validation set, so all ranks report the same numbers without communicating; rank 0 writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup() -> Context:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, nccl on GPU);
    a plain single process (on the GPU if there is one) when it describes none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), device)


def teardown(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, context: Context) -> nn.Module:
    """DDP around ``model`` when distributed (it broadcasts rank 0's weights at construction)."""
    if not context.distributed:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def per_rank_batch(batch_size: int, context: Context) -> int:
    if batch_size % context.world_size:
        raise ValueError(f"global batch size {batch_size} is not divisible by {context.world_size} processes")
    return batch_size // context.world_size
