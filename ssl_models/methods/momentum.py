"""Momentum (EMA) targets shared by BYOL, MoCo v3 and DINO."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(base: float, progress: float) -> float:
    """tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2: from tau_base to 1 (BYOL section 3.3)."""
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy that takes no gradient: the target network's starting point."""
    return copy.deepcopy(module).requires_grad_(False)


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online; buffers (BN statistics) are copied."""
    for p_online, p_target in zip(online.parameters(), target.parameters(), strict=True):
        p_target.lerp_(p_online, 1 - momentum)
    for b_online, b_target in zip(online.buffers(), target.buffers(), strict=True):
        b_target.copy_(b_online)
