"""DINO (Caron et al. 2021): self-distillation with no labels, multi-crop, centring and sharpening."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import AugmentParams, augment
from ssl_models.backbones import num_features
from ssl_models.losses import batch_center, dino_loss
from ssl_models.methods.base import SSLMethod
from ssl_models.methods.byol import asymmetric_views
from ssl_models.methods.momentum import cosine_momentum, ema_update, frozen_copy


@dataclass(frozen=True)
class DINOParams:
    """Defaults from the paper (section 3.1, appendix) and the authors' ``main_dino.py``.

    A 3-layer 2048-d head with a 256-d bottleneck, l2-normalised, then a weight-normalised
    65536-way layer; tau_s = 0.1; tau_t warmed up linearly from 0.04 to 0.07 over the first
    30% of training (30 of 100 epochs); centre momentum 0.9; teacher EMA 0.996 -> 1 (cosine);
    2 global crops (scale 0.4-1; blur 1.0 / 0.1, solarize 0.0 / 0.2, as BYOL) and 8 local crops
    (scale 0.05-0.4, blur 0.5, no solarize). The paper's local crops
    are 96 of 224 px; at 28 px that would be 12, and 16 is the smallest size every backbone
    here accepts, hence ``local_crop_size`` = 16.
    """

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    student_temperature: float = 0.1
    teacher_temperature_start: float = 0.04
    teacher_temperature: float = 0.07
    teacher_temperature_warmup: float = 0.3
    center_momentum: float = 0.9
    momentum_base: float = 0.996
    num_local_crops: int = 8
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    local_crop_size: int = 16
    view_blur_p: tuple[float, float] = (1.0, 0.1)
    view_solarize_p: tuple[float, float] = (0.0, 0.2)
    local_blur_p: float = 0.5


class DINOHead(nn.Module):
    """MLP, l2-normalisation, then a linear layer whose rows have unit norm (weight norm, g = 1)."""

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.last_weight = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.last_weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_weight, dim=1))


class DINO(SSLMethod):
    name = "dino"
    Params = DINOParams
    encoder_module = "teacher_backbone"  # the paper evaluates (and releases) the teacher (section 3.1)

    def __init__(self, backbone: nn.Module, params: DINOParams):
        super().__init__(backbone, params)
        self.head = DINOHead(num_features(backbone), params.hidden_dim, params.bottleneck_dim, params.out_dim)
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_head = frozen_copy(self.head)
        self.center: torch.Tensor
        self.register_buffer("center", torch.zeros(1, params.out_dim))
        self.momentum = params.momentum_base
        # A buffer, so a resumed run continues the warmup where it stopped.
        self.teacher_temperature: torch.Tensor
        self.register_buffer("teacher_temperature", torch.tensor(params.teacher_temperature_start))
        self._batch_center: torch.Tensor | None = None

    def make_views(self, images: torch.Tensor, aug: AugmentParams, g: torch.Generator) -> list[torch.Tensor]:
        """Two global crops (BYOL's asymmetric augmentations), then the local crops."""
        p = self.params
        global_aug = dataclasses.replace(aug, crop_scale=p.global_crop_scale)
        global_views = asymmetric_views(images, global_aug, g, p.view_blur_p, p.view_solarize_p)
        local_aug = dataclasses.replace(
            aug, crop_scale=p.local_crop_scale, blur_p=p.local_blur_p, solarize_p=0.0
        )
        local_views = [augment(images, local_aug, g, p.local_crop_size) for _ in range(p.num_local_crops)]
        return global_views + local_views

    @staticmethod
    def _by_resolution(
        views: list[torch.Tensor], network: Callable[[torch.Tensor], torch.Tensor]
    ) -> list[torch.Tensor]:
        """One forward pass per crop size: the global crops together, the local crops together."""
        outputs: list[torch.Tensor] = []
        start = 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            outputs += network(torch.cat(views[start:end])).chunk(end - start)
            start = end
        return outputs

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        student = self._by_resolution(views, lambda x: self.head(self.backbone(x)))
        with torch.no_grad():
            teacher = self._by_resolution(views[:2], lambda x: self.teacher_head(self.teacher_backbone(x)))
            self._batch_center = batch_center(teacher)
        p = self.params
        return dino_loss(
            student, teacher, self.center, p.student_temperature, self.teacher_temperature.item()
        )

    @torch.no_grad()
    def on_step_end(self, progress: float) -> None:
        """Centre EMA with the last batch (eq. 4), teacher EMA, teacher temperature warmup."""
        p = self.params
        if self._batch_center is not None:
            self.center.lerp_(self._batch_center, 1 - p.center_momentum)
            self._batch_center = None
        self.momentum = cosine_momentum(p.momentum_base, progress)
        ema_update(self.backbone, self.teacher_backbone, self.momentum)
        ema_update(self.head, self.teacher_head, self.momentum)
        warmup = (
            min(1.0, progress / p.teacher_temperature_warmup) if p.teacher_temperature_warmup > 0 else 1.0
        )
        start, end = p.teacher_temperature_start, p.teacher_temperature
        self.teacher_temperature.fill_(start + warmup * (end - start))
