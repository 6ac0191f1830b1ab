"""BYOL's regression loss between the online prediction and the target projection.

Grill et al. 2020, "Bootstrap Your Own Latent", eq. (2):
L = || q_bar - z'_bar ||^2 = 2 - 2 <q, z'> / (||q|| ||z'||), with the target side
receiving no gradient (stop-gradient), symmetrised over the two views (eq. 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of 2 - 2 cos(prediction, target) over the batch; no gradient flows to target."""
    cosine = F.cosine_similarity(prediction, target.detach(), dim=1)
    return (2 - 2 * cosine).mean()
