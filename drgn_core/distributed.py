"""Data-parallel training over several processes with torch.distributed: who this process is, and the
few collective operations the training loop needs.

A run with N processes is started by `torchrun` (`drgn train --nproc N` re-executes itself through
`torch.distributed.run` on one node; on several nodes the documented srun/torchrun line starts it). torchrun
sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in each process's environment; `from_env`
reads them and joins the process group. Collectives go over NCCL for GPU tensors and gloo for CPU tensors
(`cpu:gloo,cuda:nccl` when GPUs are present), so CPU-only machines and CI train with gloo.

Why gradients are all-reduced here rather than by `DistributedDataParallel`: every rank takes a slice of
the *same* global batch, and slices differ in size when the batch does not divide evenly (the last batch
of an epoch may leave a rank with no image at all). Summing gradients of `loss · b_rank / B` over ranks
gives the gradient of the global batch's mean loss exactly, for any world size, which is what lets a run
resume on another number of devices and still follow the same optimisation; the reduction is one flat
buffer per step (a single bucket), with the step's loss sums appended so that no second collective is paid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as td

from drgn_core.errors import DrgnError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank among `world` processes, and its rank on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = "none"

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, arr: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of `arr` (np.array_split: shares differ in length by at most 1)."""
        return np.array_split(np.asarray(arr), self.world)[self.rank] if self.active else np.asarray(arr)

    def barrier(self) -> None:
        if self.active:
            td.barrier()

    def broadcast(self, value):
        """Rank 0's `value` on every rank (a picklable Python object sent over the process group only;
        nothing is read from or written to disk this way)."""
        if not self.active:
            return value
        box = [value]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks, in place."""
        if self.active:
            td.all_reduce(t, op=td.ReduceOp.SUM)
        return t

    def close(self, wait: bool = True) -> None:
        """Leave the process group; with `wait`, first wait for every rank (rank 0 writes the outputs)."""
        if self.active and td.is_initialized():
            if wait:
                td.barrier()
            td.destroy_process_group()


def from_env() -> Dist:
    """The process group torchrun describes in the environment (joined here), or a single process.

    GPUs: when the node has a GPU for each of its processes, each process drives the GPU numbered by its
    LOCAL_RANK (`torch.cuda.set_device`), the usual one-process-per-GPU layout of torchrun; otherwise the
    group is gloo-only and training with --device cuda is refused (`rank_device`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpu >= int(os.environ.get("LOCAL_WORLD_SIZE", "1")):  # a GPU for every process of this node
        torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
    else:  # CPU processes (or more processes than GPUs: they may train on the CPU only)
        backend = "gloo"
    if not td.is_initialized():
        td.init_process_group(backend=backend)
    return Dist(rank, world, local, backend)


def rank_device(device: torch.device, dist: Dist) -> torch.device:
    """The device of this rank: GPU `LOCAL_RANK` when training on GPUs with several processes."""
    if not dist.active or device.type != "cuda":
        return device
    if "nccl" not in dist.backend:
        raise DrgnError(f"{os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this node but "
                        f"{torch.cuda.device_count()} GPUs: start at most one process per GPU, or use "
                        "--device cpu")
    if device.index not in (None, dist.local_rank):
        raise DrgnError(f"--device {device} names one GPU, but {dist.world} processes each drive their own "
                        "(use --device cuda or auto)")
    return torch.device("cuda", dist.local_rank)


def sum_gradients_(params: list[torch.nn.Parameter], stats: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Sum every parameter's gradient and the step statistics `stats` over ranks, in one collective.

    A parameter without a gradient on this rank (a rank that had no image in this batch) contributes zeros;
    afterwards every parameter holds the summed gradient. Returns the summed `stats`.
    """
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device,
                                                                       dtype=p.dtype) for p in params]
    flat = torch.cat([*grads, stats.to(grads[0].dtype)])
    dist.all_reduce_(flat)
    at = 0
    for p in params:
        g = flat[at:at + p.numel()].view_as(p)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        at += p.numel()
    return flat[at:].to(stats.dtype)
