"""MAE's reconstruction loss: mean squared error on the masked patches only.

He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", section 3: "Our loss
function computes the mean squared error (MSE) between the reconstructed and original images
in the pixel space. We compute the loss only on masked patches, similar to BERT." With
normalised pixels (table 1d) each target patch is standardised by its own mean and variance.
"""

from __future__ import annotations

import torch


def masked_patch_loss(
    pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, norm_pix: bool
) -> torch.Tensor:
    """Mean over images of the mean squared error on the masked patches (ids ``masked``, (N, M)).

    Every image has the same number of masked patches, so this is the mean over all masked
    patches, and the mean of per-rank losses is the loss of the whole batch.
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return per_patch.gather(1, masked).mean()
