"""SSL losses as pure functions of tensors, one per file."""

from ssl_models.losses.barlow_twins import barlow_twins_loss
from ssl_models.losses.byol import byol_loss
from ssl_models.losses.dino import batch_center, dino_loss
from ssl_models.losses.distillation import distillation_loss
from ssl_models.losses.mae import masked_patch_loss
from ssl_models.losses.moco import moco_v3_loss
from ssl_models.losses.negative_cosine import negative_cosine
from ssl_models.losses.nt_xent import nt_xent
from ssl_models.losses.vicreg import vicreg_loss

__all__ = [
    "barlow_twins_loss",
    "batch_center",
    "byol_loss",
    "dino_loss",
    "distillation_loss",
    "masked_patch_loss",
    "moco_v3_loss",
    "negative_cosine",
    "nt_xent",
    "vicreg_loss",
]
