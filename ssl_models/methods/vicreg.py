"""VICReg (Bardes et al. 2022): invariance, plus variance and covariance terms against collapse."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssl_models.backbones import num_features
from ssl_models.losses import vicreg_loss
from ssl_models.methods.base import SSLMethod, mlp


@dataclass(frozen=True)
class VICRegParams:
    """Defaults from the paper (section 4.3): a 3-layer 8192-d expander, lambda = mu = 25, nu = 1."""

    projection_dim: int = 8192
    invariance: float = 25.0
    variance: float = 25.0
    covariance: float = 1.0


class VICReg(SSLMethod):
    name = "vicreg"
    Params = VICRegParams

    def __init__(self, backbone: nn.Module, params: VICRegParams):
        super().__init__(backbone, params)
        dim = params.projection_dim
        self.projector = mlp(num_features(backbone), dim, dim, num_layers=3)

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        p = self.params
        return vicreg_loss(z1, z2, p.invariance, p.variance, p.covariance)
