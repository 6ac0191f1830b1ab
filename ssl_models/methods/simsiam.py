"""SimSiam (Chen & He 2021): a predictor and a stop-gradient, no negatives, no momentum encoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssl_models.backbones import num_features
from ssl_models.losses import negative_cosine
from ssl_models.methods.base import SSLMethod, mlp


@dataclass(frozen=True)
class SimSiamParams:
    """Defaults from the paper (section 3): 2048-d 3-layer projector, 512-d predictor bottleneck."""

    projection_dim: int = 2048
    predictor_hidden_dim: int = 512


class SimSiam(SSLMethod):
    name = "simsiam"
    Params = SimSiamParams

    def __init__(self, backbone: nn.Module, params: SimSiamParams):
        super().__init__(backbone, params)
        dim = params.projection_dim
        self.projector = mlp(num_features(backbone), dim, dim, last_bn=True, num_layers=3)
        self.predictor = mlp(dim, params.predictor_hidden_dim, dim)

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2
