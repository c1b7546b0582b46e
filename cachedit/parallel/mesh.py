"""The world every parallel mode shares: its size check and the hybrid (cfg, ring, ulysses, tensor) mesh."""

from __future__ import annotations

import torch.distributed as dist

from ..config import ParallelConfig

MESH_DIMS = ("cfg", "ring", "ulysses", "tensor")  # outermost first


def check_world(config: ParallelConfig) -> None:
    """torch.distributed is initialised with exactly the product of the degrees (ValueError otherwise).
    Every parallel mode asks this one question, so each answers it with the same message."""
    n = config.world_size
    degrees = " x ".join(f"{k}={getattr(config, k)}" for k in ("ulysses", "ring", "tensor", "cfg")
                         if getattr(config, k) > 1) or "every degree 1"
    launch = f"launch with `torchrun --nproc-per-node {n} ...` (or init_process_group with world_size={n})"
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"parallel: {degrees} needs torch.distributed initialised with world size {n}; {launch}")
    if dist.get_world_size() != n:
        raise ValueError(f"parallel: {degrees} needs world size {n}, but torch.distributed has "
                         f"{dist.get_world_size()}; {launch}")


def hybrid_mesh(config: ParallelConfig, device_type: str):
    """The (cfg, ring, ulysses, tensor) device mesh when more than one degree is > 1; None when one
    dimension is the whole world. cfg outermost: each CFG half is a block of ranks with its own
    context- and tensor-parallel groups; tensor innermost: a tensor group is neighbouring ranks."""
    if sum(getattr(config, d) > 1 for d in MESH_DIMS) < 2:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, tuple(getattr(config, d) for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)
