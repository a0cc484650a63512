"""torch.distributed helpers: process-group setup from torchrun's environment and an all-gather
that keeps gradients (for contrastive losses whose negatives come from every rank).

A utility below the data flow: losses (cross-rank negatives), methods (whether to gather) and the
trainer (process-group setup) import it; it imports nothing of medcl.

Launch a multi-GPU run with ``torchrun --nproc_per_node=G -m medcl pretrain ...``: the pretrain
API calls :func:`init_from_env`, shards batches by rank (``optim.batch_size`` is the GLOBAL batch)
and the NT-Xent / SupCon losses gather projections from all ranks via :func:`gather_with_grad`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    With loss L = mean over ranks of L_r and DDP averaging parameter gradients, the gradient
    reaching rank k's local tensor must be sum_r dL_r/dx_k: all-reduce(SUM) then take our slice.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:  # type: ignore[override]
        stacked = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return stacked[dist.get_rank()]


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` [n, ...] from every rank along dim 0 (rank order), keeping gradients.

    Without an initialised process group (or with one process) returns ``tensor`` unchanged.
    """
    if not is_distributed():
        return tensor
    return torch.cat(_GatherWithGrad.apply(tensor), dim=0)


def gather_no_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank (labels, indices): no gradient."""
    if not is_distributed():
        return tensor
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


def init_from_env() -> tuple[int, int, int]:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1).

    Returns (rank, world_size, local_rank). NCCL on CUDA, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), local_rank
