"""SSL losses as pure functions of tensors, one per file."""

from ssl_models.losses.byol import byol_loss
from ssl_models.losses.nt_xent import nt_xent

__all__ = ["byol_loss", "nt_xent"]
