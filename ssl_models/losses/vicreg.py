"""VICReg: variance-invariance-covariance regularisation.

Bardes et al. 2022, "VICReg", eq. (1)-(6): l = lambda * s(Z, Z') + mu * [v(Z) + v(Z')] / 2 +
nu * [c(Z) + c(Z')], with s the mean squared distance, v(Z) = mean_j max(0, gamma - sqrt(Var(z_j) + eps))
and c(Z) = (1/d) * sum_{i != j} Cov(Z)_ij^2; lambda = mu = 25, nu = 1, gamma = 1. The two branches'
variance terms are averaged and their covariance terms summed, as in the authors' code
(facebookresearch/vicreg, ``main_vicreg.py``) and LightlySSL's ``VICRegLoss``. Computed in fp32
under autocast: the statistics of a bf16 batch are too coarse.

Under data parallelism the embeddings are gathered with gradient and every rank computes the
loss of the whole batch, as the authors' code does (``FullGatherLayer``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_models.distributed import gather


def _variance(z: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    return F.relu(gamma - torch.sqrt(z.var(0) + eps)).mean()


def _covariance(z: torch.Tensor) -> torch.Tensor:
    centred = z - z.mean(0)
    cov = centred.T @ centred / (z.shape[0] - 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / z.shape[1]


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    invariance: float = 25.0,
    variance: float = 25.0,
    covariance: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """VICReg loss of two (N, D) embeddings of the same N images."""
    z1, z2 = gather(z1).float(), gather(z2).float()
    with torch.autocast(z1.device.type, enabled=False):
        return (
            invariance * F.mse_loss(z1, z2)
            + variance * (_variance(z1, gamma, eps) + _variance(z2, gamma, eps)) / 2
            + covariance * (_covariance(z1) + _covariance(z2))
        )
