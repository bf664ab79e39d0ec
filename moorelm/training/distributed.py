"""Processes under torchrun: ranks, collectives, and the DDP / FSDP2 wrapping of the model.

Under torchrun every rank takes a disjoint slice of the same global batch; only rank 0
writes logs and checkpoints.

FSDP2 (``fully_shard``): each block is one unit whose parameters, gradients and optimizer
state live sharded across ranks (dim 0) and are all-gathered only for its forward/backward.
Checkpoints stay in the single-process format: shards are gathered into full tensors on
save (``to_host``), and full tensors are loaded before sharding (weights) or cut into shards
(``shard_like``, optimizer state) on resume, so a run resumes under any world size, with or
without FSDP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moorelm.device import resolve_device
from moorelm.model import GPT


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_req: str) -> tuple[Dist, torch.device]:
    """This process's rank and device (one process unless torchrun set WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_req)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    base = resolve_device(device_req)
    device = torch.device("cuda", local) if base.type == "cuda" else base
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local), device


def broadcast_float(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return float(t.item())


def all_mean(value: float, d: Dist, device: torch.device) -> float:
    """The mean of ``value`` over all ranks."""
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / d.world


def all_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """The sums of ``values`` over all ranks."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def fully_shard(model: GPT, d: Dist, device: torch.device) -> None:
    """Shard ``model`` in place over all ranks (moves the shards to ``device``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard as shard

    mesh = init_device_mesh(device.type, (d.world,))
    for block in model.blocks:
        shard(block, mesh=mesh)
    shard(model, mesh=mesh)  # the rest: embeddings, final norm, head


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def wrap_for_data_parallel(model: torch.nn.Module, d: Dist, device: torch.device,
                           sharded: bool) -> torch.nn.Module:
    """The module a training step calls: DDP around ``model`` with several unsharded
    processes, else ``model`` itself (FSDP shards in place, one process needs nothing)."""
    if d.world == 1 or sharded:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def to_host(tensors: dict[str, torch.Tensor], sharded: bool) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies for saving; with ``sharded`` DTensor shards are first
    gathered into full tensors, a collective: every rank must call this with the same names
    in the same order."""
    if sharded:
        from torch.distributed.tensor import DTensor

        tensors = {k: t.full_tensor().cpu() if isinstance(t, DTensor) else t
                   for k, t in tensors.items()}
    return {k: t.detach().contiguous().cpu() for k, t in tensors.items()}


def shard_like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor (every rank read the same one) cut like ``param``'s shards, when
    ``param`` is a DTensor of the same shape; otherwise ``t`` unchanged."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and t.shape == param.shape:
        # each rank just keeps its own slice: no communication
        return distribute_tensor(t.to(param.device_mesh.device_type), param.device_mesh,
                                 param.placements, src_data_rank=None)
    return t
