"""Small instances of every registered method, shared by the method tests."""

from __future__ import annotations

import torch

from ssl_models import METHODS, Encoder, create_backbone, create_method
from ssl_models.methods import SSLMethod

# Paper-sized heads (8192-d, 65536-way) make the tests slow on a CPU: small ones exercise the
# same code.
SMALL_HEADS: dict[str, dict[str, object]] = {
    "moco": {"hidden_dim": 64},
    "byol": {"hidden_dim": 128},
    "simsiam": {"projection_dim": 128, "predictor_hidden_dim": 32},
    "barlow_twins": {"projection_dim": 128},
    "vicreg": {"projection_dim": 128},
    "dino": {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32, "num_local_crops": 2},
    "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
    "rotation": {"hidden_dim": 64},
    "relative_patch": {"hidden_dim": 64},
}


def backbone_for(name: str) -> str:
    """The first backbone the method supports, or small_cnn if it supports all."""
    supported = METHODS[name].backbones
    return supported[0] if supported else "small_cnn"


def small_encoder(backbone: str = "small_cnn", seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(create_backbone(backbone, 1, 28), 0.5, 0.25)


def small_method(name: str, seed: int = 0, **overrides: object) -> SSLMethod:
    """The method with small heads on its first supported backbone, initialised from ``seed``."""
    encoder = small_encoder(backbone_for(name), seed)
    return create_method(name, encoder, {**SMALL_HEADS.get(name, {}), **overrides})
