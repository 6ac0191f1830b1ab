"""The interface every self-supervised method implements."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ssl_models.augment import AugmentParams, augment


def mlp(
    in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = False, num_layers: int = 2
) -> nn.Sequential:
    """Projector / predictor head: (Linear-BN-ReLU) x (num_layers - 1), then Linear.

    Two layers as in SimCLR (fig. 2) and BYOL (section 3.3); three in SimSiam, Barlow Twins and
    VICReg.
    """
    layers: list[nn.Module] = []
    for i in range(num_layers - 1):
        layers += [
            nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
        ]
    layers.append(nn.Linear(hidden_dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class SSLMethod(nn.Module):
    """A backbone plus whatever heads and targets a method trains it with.

    Subclasses set ``name`` and ``Params`` (a dataclass of the paper's hyper-parameters,
    defaults from the paper) and implement ``loss``. The training loop only calls
    ``make_views``, the module itself (``forward`` is ``loss``, so ``DistributedDataParallel``
    can wrap a method) and ``on_step_end``, so a method owns everything else.

    The contract that makes a method correct under data parallelism: ``make_views`` draws
    all of the step's randomness, and every tensor it returns has the image index as its
    first dimension, so splitting each view along dim 0 across ranks is the same batch.
    ``loss`` is then a deterministic function of the views, and gathers across ranks
    (``ssl_models.distributed``) wherever it needs the whole batch.
    """

    name: ClassVar[str]
    Params: ClassVar[type]
    backbones: ClassVar[tuple[str, ...] | None] = None  # the backbones it supports; None: all
    encoder_module: ClassVar[str] = "backbone"  # the submodule whose weights are the pretrained encoder

    def __init__(self, backbone: nn.Module, params: Any):
        super().__init__()
        self.backbone = backbone
        self.params = params

    def make_views(self, images: torch.Tensor, aug: AugmentParams, g: torch.Generator) -> list[torch.Tensor]:
        """Two independently augmented views of a float batch in [0, 1]."""
        return [augment(images, aug, g), augment(images, aug, g)]

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        return self.loss(views)

    def on_step_end(self, progress: float) -> None:
        """Called after each optimiser step with the fraction of training done, in [0, 1]."""
