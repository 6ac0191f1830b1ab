"""Rotation prediction (Gidaris, Singh & Komodakis 2018, "Unsupervised Representation Learning by
Predicting Image Rotations"): classify which of 0, 90, 180, 270 degrees an image was rotated by.

Eq. (1)-(2): loss(X) = -1/K sum_y log F^y(g(X | y)) over the K = 4 rotations; as in the paper
(section 2.2), all four rotated copies of every image are in the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import AugmentParams, augment
from ssl_models.backbones import num_features
from ssl_models.methods.base import SSLMethod, mlp

ROTATIONS = 4


@dataclass(frozen=True)
class RotationParams:
    """The paper classifies from the network's last block; here a 2-layer MLP head on the features."""

    hidden_dim: int = 512


class Rotation(SSLMethod):
    name = "rotation"
    Params = RotationParams

    def __init__(self, backbone: nn.Module, params: RotationParams):
        super().__init__(backbone, params)
        self.head = mlp(num_features(backbone), params.hidden_dim, ROTATIONS)

    def make_views(self, images: torch.Tensor, aug: AugmentParams, g: torch.Generator) -> list[torch.Tensor]:
        """One augmented view; the four rotations are deterministic and made in ``loss``."""
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"rotation needs square images, got {tuple(images.shape[-2:])}")
        return [augment(images, aug, g)]

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        (x,) = views
        rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(ROTATIONS)])
        labels = torch.arange(ROTATIONS, device=x.device).repeat_interleave(x.shape[0])
        return F.cross_entropy(self.head(self.backbone(rotated)), labels)
