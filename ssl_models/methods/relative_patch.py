"""Relative patch position (Doersch, Gupta & Efros 2015, "Unsupervised Visual Representation
Learning by Context Prediction"): which of the 8 neighbours of the centre patch is this one?

Section 3: patches on a 3 x 3 grid with gaps between them and random jitter (so the task cannot
be solved from continuing edges), each embedded by the shared network; the pair's features
are concatenated and classified into the 8 positions. The paper samples one pair per image;
here every image gives all 8 pairs (its 9 patches are embedded once), which is more signal
per forward pass for the same task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import AugmentParams, color_jitter
from ssl_models.backbones import num_features
from ssl_models.methods.base import SSLMethod, mlp

GRID = 3
CENTRE = 4
NEIGHBOURS = [i for i in range(GRID * GRID) if i != CENTRE]


@dataclass(frozen=True)
class RelativePatchParams:
    """The paper's proportions: 96 px patches on a 144 px grid (gap 1/3 of a cell), jitter up to
    7 px (5% of a cell), a 4096-d fully connected pair classifier. Patches are resampled to
    ``patch_size`` px, which must suit the backbone (16 for small_cnn's four pooling steps)."""

    gap: float = 1 / 3
    jitter: float = 0.05
    patch_size: int = 16
    hidden_dim: int = 4096


def grid_patches(
    images: torch.Tensor, gap: float, jitter: float, patch_size: int, g: torch.Generator
) -> torch.Tensor:
    """The 9 jittered patches of every image, (N, 9, C, patch_size, patch_size), in one grid_sample."""
    n, c = images.shape[:2]
    cell = 2 / GRID  # a cell's width in grid_sample's [-1, 1] coordinates
    centres = -1 + cell * (torch.arange(GRID, dtype=torch.float32) + 0.5)
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    offsets = (torch.rand(n, GRID * GRID, 2, generator=g) * 2 - 1) * jitter * cell
    theta = torch.zeros(n, GRID * GRID, 2, 3)
    theta[..., 0, 0] = theta[..., 1, 1] = (1 - gap) * cell / 2
    theta[..., 0, 2] = cx.flatten() + offsets[..., 0]
    theta[..., 1, 2] = cy.flatten() + offsets[..., 1]
    theta = theta.view(-1, 2, 3).to(images.device, images.dtype)
    grid = F.affine_grid(theta, [n * GRID * GRID, c, patch_size, patch_size], align_corners=False)
    source = images.repeat_interleave(GRID * GRID, dim=0)
    patches = F.grid_sample(source, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return patches.view(n, GRID * GRID, c, patch_size, patch_size)


class RelativePatch(SSLMethod):
    name = "relative_patch"
    Params = RelativePatchParams

    def __init__(self, backbone: nn.Module, params: RelativePatchParams):
        super().__init__(backbone, params)
        self.head = mlp(2 * num_features(backbone), params.hidden_dim, len(NEIGHBOURS))

    def make_views(self, images: torch.Tensor, aug: AugmentParams, g: torch.Generator) -> list[torch.Tensor]:
        """The grid of patches, with brightness/contrast jittered per patch against low-level cues."""
        p = self.params
        patches = grid_patches(images, p.gap, p.jitter, p.patch_size, g)
        flat = patches.flatten(0, 1)
        flat = color_jitter(flat, aug.brightness, aug.contrast, aug.jitter_p, g)
        return [flat.view_as(patches)]

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        (patches,) = views
        n = patches.shape[0]
        features = self.backbone(patches.flatten(0, 1)).view(n, GRID * GRID, -1)
        centre = features[:, CENTRE : CENTRE + 1].expand(-1, len(NEIGHBOURS), -1)
        pairs = torch.cat([centre, features[:, NEIGHBOURS]], dim=-1).flatten(0, 1)
        labels = torch.arange(len(NEIGHBOURS), device=patches.device).repeat(n)
        return F.cross_entropy(self.head(pairs), labels)
