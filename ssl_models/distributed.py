"""Collectives that keep gradients, and a BatchNorm synchronised across ranks.

The bugs users most often report in distributed SSL are here: negatives gathered without
gradient, statistics computed per rank, gradients off by the world size. The rule used
throughout: a loss whose value needs the whole batch gathers with ``gather`` (gradient
flows back to the rank that produced each row), and ``DistributedDataParallel`` averages the
ranks' gradients. With ``gather``'s backward summing over ranks, the averaged gradient is
exactly the single-process gradient of the mean of the ranks' losses, whether each rank
computes the loss of its own rows (SimCLR, MoCo) or the same whole-batch loss (Barlow Twins,
VICReg). Everything here is a no-op when ``torch.distributed`` is not initialised, and
works with gloo on CPU as with NCCL on GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the sum over ranks of its rows' gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        stacked = torch.stack(grads)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return stacked[dist.get_rank()]


class _AllReduceWithGrad(torch.autograd.Function):
    """all_reduce (sum) whose backward is the sum over ranks of the output's gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 in rank order; gradient flows if ``x`` has one.

    Every rank must pass the same shape (the training loop drops the last partial batch).
    """
    if world_size() == 1:
        return x
    if x.requires_grad:
        return torch.cat(_GatherWithGrad.apply(x))
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over ranks; gradient flows if ``x`` has one."""
    if world_size() == 1:
        return x
    if x.requires_grad:
        out: torch.Tensor = _AllReduceWithGrad.apply(x)
        return out
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are over the whole distributed batch.

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this one is built from ``all_reduce_sum``,
    so it also runs on CPU with gloo, and its backward is plain autograd. Two passes (mean,
    then the mean squared deviation) keep the variance as accurate as single-process
    BatchNorm. Outside training, or in a single process, it is ``F.batch_norm``.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or world_size() == 1:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = all_reduce_sum(torch.tensor(float(x.numel() // x.shape[1]), device=x.device))
        mean = all_reduce_sum(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = all_reduce_sum(centred.pow(2).sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                factor = 1 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(unbiased.detach(), factor)
        return out


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm in ``module`` by a ``SyncBatchNorm`` with the same state."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        sync = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        sync.load_state_dict(module.state_dict())
        for new, old in zip(sync.parameters(), module.parameters(), strict=True):
            new.requires_grad_(old.requires_grad)
        sync.train(module.training)
        floating = [t for t in module.state_dict().values() if t.is_floating_point()]
        return sync.to(floating[0].device, floating[0].dtype) if floating else sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module


__all__ = ["SyncBatchNorm", "all_reduce_sum", "convert_sync_batchnorm", "gather", "rank", "world_size"]
