"""BYOL (Grill et al. 2020): predict a slow-moving target network's projection of another view."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ssl_models.augment import AugmentParams, augment
from ssl_models.backbones import num_features
from ssl_models.losses import byol_loss
from ssl_models.methods.base import SSLMethod, mlp


@dataclass(frozen=True)
class BYOLParams:
    """Defaults from the paper: 4096-d hidden, 256-d projection, tau_base = 0.996 (section 3.3)."""

    hidden_dim: int = 4096
    projection_dim: int = 256
    momentum_base: float = 0.996


class BYOL(SSLMethod):
    name = "byol"
    Params = BYOLParams

    def __init__(self, backbone: nn.Module, params: BYOLParams):
        super().__init__(backbone, params)
        self.projector = mlp(num_features(backbone), params.hidden_dim, params.projection_dim)
        self.predictor = mlp(params.projection_dim, params.hidden_dim, params.projection_dim)
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.momentum = params.momentum_base

    def make_views(self, images: torch.Tensor, aug: AugmentParams, g: torch.Generator) -> list[torch.Tensor]:
        """Asymmetric views (BYOL table 6): blur always / rarely, solarize never / sometimes."""
        first = AugmentParams(**{**aug.__dict__, "blur_p": 1.0, "solarize_p": 0.0})
        second = AugmentParams(**{**aug.__dict__, "blur_p": 0.1, "solarize_p": 0.2})
        return [augment(images, first, g), augment(images, second, g)]

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        v1, v2 = views
        p1 = self.predictor(self.projector(self.backbone(v1)))
        p2 = self.predictor(self.projector(self.backbone(v2)))
        with torch.no_grad():
            t1 = self.target_projector(self.target_backbone(v1))
            t2 = self.target_projector(self.target_backbone(v2))
        return byol_loss(p1, t2) + byol_loss(p2, t1)

    @torch.no_grad()
    def on_step_end(self, progress: float) -> None:
        """EMA update with tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 (section 3.3)."""
        base = self.params.momentum_base
        self.momentum = 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2
        for online, target in (
            (self.backbone, self.target_backbone),
            (self.projector, self.target_projector),
        ):
            for p_online, p_target in zip(online.parameters(), target.parameters(), strict=True):
                p_target.lerp_(p_online, 1 - self.momentum)
            for b_online, b_target in zip(online.buffers(), target.buffers(), strict=True):
                b_target.copy_(b_online)
