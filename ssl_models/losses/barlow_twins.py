"""Barlow Twins' redundancy-reduction loss.

Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", eq. (1)-(2):
L = sum_i (1 - C_ii)^2 + lambda * sum_i sum_{j != i} C_ij^2, where C is the cross-correlation
of the two views' embeddings, each normalised along the batch (zero mean, unit variance).

Under data parallelism the embeddings are gathered with gradient and every rank computes the
loss of the whole batch, so the statistics are not off by the world size. Computed in fp32 under
autocast: a bf16 cross-correlation of thousands of features is too coarse.
"""

from __future__ import annotations

import torch

from ssl_models.distributed import gather


def _standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    # As BatchNorm1d(affine=False) in the authors' code: biased variance.
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambda_offdiag: float = 5.1e-3) -> torch.Tensor:
    """Loss of the cross-correlation matrix of two (N, D) embeddings of the same N images."""
    z1, z2 = gather(z1).float(), gather(z2).float()
    with torch.autocast(z1.device.type, enabled=False):
        c = _standardise(z1).T @ _standardise(z2) / z1.shape[0]
        on_diag = (torch.diagonal(c) - 1).pow(2).sum()
        off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
        return on_diag + lambda_offdiag * off_diag
