"""BYOL (Grill et al. 2020): predict a slow-moving target network's projection of another view."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ssl_models.augment import AugmentParams, augment
from ssl_models.backbones import num_features
from ssl_models.losses import byol_loss
from ssl_models.methods.base import SSLMethod, mlp
from ssl_models.methods.momentum import cosine_momentum, ema_update, frozen_copy


def asymmetric_views(
    images: torch.Tensor,
    aug: AugmentParams,
    g: torch.Generator,
    blur_p: tuple[float, float],
    solarize_p: tuple[float, float],
) -> list[torch.Tensor]:
    """Two views whose blur and solarize probabilities differ (BYOL's table 6: blur 1.0 / 0.1,
    solarize 0.0 / 0.2); these replace ``aug``'s own ``blur_p`` and ``solarize_p``."""
    return [
        augment(images, dataclasses.replace(aug, blur_p=blur, solarize_p=solarize), g)
        for blur, solarize in zip(blur_p, solarize_p, strict=True)
    ]


@dataclass(frozen=True)
class BYOLParams:
    """Defaults from the paper: 4096-d hidden, 256-d projection, tau_base = 0.996 (section 3.3);
    the two views' blur and solarize probabilities of table 6."""

    hidden_dim: int = 4096
    projection_dim: int = 256
    momentum_base: float = 0.996
    view_blur_p: tuple[float, float] = (1.0, 0.1)
    view_solarize_p: tuple[float, float] = (0.0, 0.2)


class BYOL(SSLMethod):
    name = "byol"
    Params = BYOLParams

    def __init__(self, backbone: nn.Module, params: BYOLParams):
        super().__init__(backbone, params)
        self.projector = mlp(num_features(backbone), params.hidden_dim, params.projection_dim)
        self.predictor = mlp(params.projection_dim, params.hidden_dim, params.projection_dim)
        self.target_backbone = frozen_copy(backbone)
        self.target_projector = frozen_copy(self.projector)
        self.momentum = params.momentum_base

    def make_views(self, images: torch.Tensor, aug: AugmentParams, g: torch.Generator) -> list[torch.Tensor]:
        return asymmetric_views(images, aug, g, self.params.view_blur_p, self.params.view_solarize_p)

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        v1, v2 = views
        p1 = self.predictor(self.projector(self.backbone(v1)))
        p2 = self.predictor(self.projector(self.backbone(v2)))
        with torch.no_grad():
            t1 = self.target_projector(self.target_backbone(v1))
            t2 = self.target_projector(self.target_backbone(v2))
        return byol_loss(p1, t2) + byol_loss(p2, t1)

    def on_step_end(self, progress: float) -> None:
        """EMA update with tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 (section 3.3)."""
        self.momentum = cosine_momentum(self.params.momentum_base, progress)
        ema_update(self.backbone, self.target_backbone, self.momentum)
        ema_update(self.projector, self.target_projector, self.momentum)
