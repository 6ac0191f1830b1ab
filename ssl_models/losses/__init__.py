"""SSL losses as pure functions of tensors, one per file."""

from ssl_models.losses.barlow_twins import barlow_twins_loss
from ssl_models.losses.byol import byol_loss
from ssl_models.losses.negative_cosine import negative_cosine
from ssl_models.losses.nt_xent import nt_xent
from ssl_models.losses.vicreg import vicreg_loss

__all__ = ["barlow_twins_loss", "byol_loss", "negative_cosine", "nt_xent", "vicreg_loss"]
