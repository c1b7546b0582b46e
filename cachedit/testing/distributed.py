"""Run a function on N local processes joined in one torch.distributed group (gloo on a CPU).

    results = run_distributed(fn, world_size=2, backend=backend, args=(x,))

`fn(rank, world_size, *args)` runs in each process after `init_process_group`; its return
value (tensors, numbers, dicts of them) comes back as `results[rank]`. An exception in any
rank is re-raised here with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, dist_backend, device_type, fn, args, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        if device_type in ("cuda", "npu"):  # before the process group: NCCL / HCCL bind to the current device
            getattr(torch, device_type).set_device(rank)
        dist.init_process_group(dist_backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": result}, os.path.join(outdir, f"{rank}.pt"))
    except BaseException:
        torch.save({"error": traceback.format_exc()}, os.path.join(outdir, f"{rank}.pt"))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, backend=None, args: tuple = (), dist_backend: str | None = None,
                    device_type: str = "cpu") -> list:
    """`fn` must be importable (module level) so spawned processes can find it."""
    if backend is not None:
        dist_backend, device_type = backend.dist_backend, backend.device_type
    dist_backend = dist_backend or "gloo"
    with tempfile.TemporaryDirectory() as outdir:
        try:
            mp.spawn(_worker, args=(world_size, free_port(), dist_backend, device_type, fn, args, outdir),
                     nprocs=world_size, join=True)
        except mp.ProcessRaisedException:
            pass  # reported below with the failing rank's own traceback
        results = []
        for rank in range(world_size):
            path = os.path.join(outdir, f"{rank}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {rank} of {world_size} died without a result")
            out = torch.load(path, weights_only=False)
            if "error" in out:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{out['error']}")
            results.append(out["ok"])
    return results
