"""MoCo v3 (Chen, Xie & He 2021): queries from the online encoder, keys from a momentum encoder.

Queue-free: the keys are the momentum encoder's outputs of the other view of every image in
the batch (algorithm 1), gathered across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssl_models.augment import AugmentParams
from ssl_models.backbones import num_features
from ssl_models.losses import moco_v3_loss
from ssl_models.methods.base import SSLMethod, mlp
from ssl_models.methods.byol import asymmetric_views
from ssl_models.methods.momentum import cosine_momentum, ema_update, frozen_copy


@dataclass(frozen=True)
class MoCoParams:
    """Defaults from the paper's ResNet-50 recipe (appendix; the authors' ``main_moco.py``).

    tau = 1.0 (0.2 for ViTs), a 2-layer 4096-d projector to 256-d (3 layers for ViTs) with a
    final BN, a 2-layer 4096-d predictor, momentum 0.99 raised to 1 by a cosine schedule; BYOL's
    asymmetric blur and solarize probabilities per view (section 4).
    """

    temperature: float = 1.0
    hidden_dim: int = 4096
    projection_dim: int = 256
    projector_layers: int = 2
    momentum_base: float = 0.99
    view_blur_p: tuple[float, float] = (1.0, 0.1)
    view_solarize_p: tuple[float, float] = (0.0, 0.2)


class MoCo(SSLMethod):
    name = "moco"
    Params = MoCoParams

    def __init__(self, backbone: nn.Module, params: MoCoParams):
        super().__init__(backbone, params)
        self.projector = mlp(
            num_features(backbone),
            params.hidden_dim,
            params.projection_dim,
            last_bn=True,
            num_layers=params.projector_layers,
        )
        self.predictor = mlp(params.projection_dim, params.hidden_dim, params.projection_dim)
        self.momentum_backbone = frozen_copy(backbone)
        self.momentum_projector = frozen_copy(self.projector)
        self.momentum = params.momentum_base

    def make_views(self, images: torch.Tensor, aug: AugmentParams, g: torch.Generator) -> list[torch.Tensor]:
        """BYOL's asymmetric augmentations, as MoCo v3 uses (section 4)."""
        return asymmetric_views(images, aug, g, self.params.view_blur_p, self.params.view_solarize_p)

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        """ctr(q1, k2) + ctr(q2, k1), algorithm 1."""
        v1, v2 = views
        q1 = self.predictor(self.projector(self.backbone(v1)))
        q2 = self.predictor(self.projector(self.backbone(v2)))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(v1))
            k2 = self.momentum_projector(self.momentum_backbone(v2))
        t = self.params.temperature
        return moco_v3_loss(q1, k2, t) + moco_v3_loss(q2, k1, t)

    def on_step_end(self, progress: float) -> None:
        self.momentum = cosine_momentum(self.params.momentum_base, progress)
        ema_update(self.backbone, self.momentum_backbone, self.momentum)
        ema_update(self.projector, self.momentum_projector, self.momentum)
