"""Registry of self-supervised methods: adding a method is one file plus one line here."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ssl_models.methods.barlow_twins import BarlowTwins
from ssl_models.methods.base import SSLMethod
from ssl_models.methods.byol import BYOL
from ssl_models.methods.dino import DINO
from ssl_models.methods.mae import MAE
from ssl_models.methods.moco import MoCo
from ssl_models.methods.relative_patch import RelativePatch
from ssl_models.methods.rotation import Rotation
from ssl_models.methods.simclr import SimCLR
from ssl_models.methods.simsiam import SimSiam
from ssl_models.methods.vicreg import VICReg

METHODS: dict[str, type[SSLMethod]] = {
    m.name: m for m in (SimCLR, MoCo, BYOL, SimSiam, BarlowTwins, VICReg, DINO, MAE, Rotation, RelativePatch)
}


def method_params(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The method's parameter dataclass with ``overrides`` applied; unknown keys raise."""
    cls = get_method(name)
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    unknown = sorted(set(overrides or {}) - fields)
    if unknown:
        raise ValueError(f"unknown {name} parameter(s) {unknown}; known: {sorted(fields)}")
    return cls.Params(**(overrides or {}))


def get_method(name: str) -> type[SSLMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None


def create_method(name: str, backbone: nn.Module, overrides: dict[str, Any] | None = None) -> SSLMethod:
    return get_method(name)(backbone, method_params(name, overrides))


__all__ = ["METHODS", "SSLMethod", "create_method", "get_method", "method_params"]
