"""NT-Xent, the normalized temperature-scaled cross entropy of SimCLR.

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
eq. (1): l(i, j) = -log exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau),
averaged over all 2N positive pairs (i, j) and (j, i) of a batch of N images.

Under data parallelism each rank's 2n anchors are contrasted with the views of the whole
batch, gathered with gradient, so the mean of the ranks' losses is the single-process loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_models.distributed import gather, rank


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Mean NT-Xent over both views; ``z1[i]`` and ``z2[i]`` are the two views of image i."""
    if z1.shape != z2.shape:
        raise ValueError(f"views must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    candidates = torch.cat([gather(z1), gather(z2)])  # 2N rows: all first views, then all second
    big_n = candidates.shape[0] // 2
    logits = torch.cat([z1, z2]) @ candidates.T / temperature
    own = torch.arange(n, device=z1.device) + rank() * n  # this rank's images in the whole batch
    self_columns = torch.cat([own, own + big_n])
    logits[torch.arange(2 * n, device=z1.device), self_columns] = float("-inf")
    positives = torch.cat([own + big_n, own])
    return F.cross_entropy(logits, positives)
