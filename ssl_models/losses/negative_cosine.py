"""SimSiam's symmetric negative cosine similarity with stop-gradient.

Chen & He 2021, "Exploring Simple Siamese Representation Learning", eq. (1)-(3):
D(p1, z2) = -p1/||p1|| . z2/||z2||, L = D(p1, stopgrad(z2))/2 + D(p2, stopgrad(z1))/2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def negative_cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of -cos(prediction, target) over the batch; no gradient flows to target."""
    return -F.cosine_similarity(prediction, target.detach(), dim=1).mean()
