"""SimCLR (Chen et al. 2020): contrast two views of each image against the rest of the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssl_models.backbones import num_features
from ssl_models.losses import nt_xent
from ssl_models.methods.base import SSLMethod, mlp


@dataclass(frozen=True)
class SimCLRParams:
    """Defaults from the paper: tau = 0.5 (table 5, batch <= 512), a 128-d projection."""

    temperature: float = 0.5
    hidden_dim: int = 512
    projection_dim: int = 128


class SimCLR(SSLMethod):
    name = "simclr"
    Params = SimCLRParams

    def __init__(self, backbone: nn.Module, params: SimCLRParams):
        super().__init__(backbone, params)
        self.projector = mlp(num_features(backbone), params.hidden_dim, params.projection_dim)

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        return nt_xent(z1, z2, self.params.temperature)
