"""Self-supervised pretraining of the configured method and backbone, in this process.

The checkpoint lives under a key of the data hash and the pretraining config, so running
the same pretraining again resumes (or returns at once) instead of starting over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ssl_models import Encoder, create_backbone, create_method
from ssl_models.train import pretrain
from tasks.config import PipelineConfig
from tasks.data import PreparedData, load_dataset


@dataclass(frozen=True)
class PretrainOutput:
    checkpoint_path: str
    encoder_path: str
    steps: int
    resumed_from_step: int
    history: list[dict[str, float]] = field(default_factory=list)


def build_encoder(cfg: PipelineConfig, mean: float, std: float) -> Encoder:
    """A randomly initialised encoder of the configured backbone.

    Seeds the global RNG with ``cfg.seed``, so the method's heads built right after it are
    seeded too.
    """
    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.model.backbone, cfg.data.channels, cfg.data.image_size)
    return Encoder(backbone, mean, std)


def load_encoder(cfg: PipelineConfig, data: PreparedData, encoder_path: str) -> Encoder:
    encoder = build_encoder(cfg, data.mean, data.std)
    encoder.load_state_dict(torch.load(encoder_path, map_location="cpu", weights_only=True))
    return encoder


def run_dir(cfg: PipelineConfig, data: PreparedData) -> Path:
    key = cfg.digest("seed", "model", "augment", "pretrain") + "-" + data.unlabeled.digest[:8]
    return cfg.workspace_path / "pretrain" / key


def pretrain_encoder(
    cfg: PipelineConfig,
    data: PreparedData,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> PretrainOutput:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    folder = run_dir(cfg, data)
    method = create_method(
        cfg.pretrain.method, build_encoder(cfg, data.mean, data.std), cfg.pretrain.method_params
    )
    images = load_dataset(data.unlabeled).images
    result = pretrain(
        method,
        images,
        cfg.augment.params(),
        cfg.pretrain.settings(cfg.seed),
        checkpoint_path=folder / "checkpoint.pt",
        on_epoch_end=on_epoch_end,
    )
    encoder_path = folder / "encoder.pt"
    torch.save(method.backbone.state_dict(), encoder_path)
    return PretrainOutput(
        checkpoint_path=str(folder / "checkpoint.pt"),
        encoder_path=str(encoder_path),
        steps=result.steps,
        resumed_from_step=result.resumed_from_step,
        history=result.history,
    )
