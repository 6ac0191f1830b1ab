"""Barlow Twins (Zbontar et al. 2021): make the views' cross-correlation matrix the identity."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssl_models.backbones import num_features
from ssl_models.losses import barlow_twins_loss
from ssl_models.methods.base import SSLMethod, mlp


@dataclass(frozen=True)
class BarlowTwinsParams:
    """Defaults from the paper (section 4): a 3-layer 8192-d projector, lambda = 5.1e-3."""

    projection_dim: int = 8192
    lambda_offdiag: float = 5.1e-3


class BarlowTwins(SSLMethod):
    name = "barlow_twins"
    Params = BarlowTwinsParams

    def __init__(self, backbone: nn.Module, params: BarlowTwinsParams):
        super().__init__(backbone, params)
        dim = params.projection_dim
        self.projector = mlp(num_features(backbone), dim, dim, num_layers=3)

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        return barlow_twins_loss(z1, z2, self.params.lambda_offdiag)
