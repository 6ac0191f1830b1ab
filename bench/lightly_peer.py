"""LightlySSL (the ``lightly`` package) as the peer of the benchmarks: its SimCLR and BYOL, trained
the way its documentation does it, on the same backbone, images, optimiser and schedule as ours.

What is LightlySSL's here: the per-image PIL transforms (``SimCLRTransform``, BYOL's two view
transforms) run in ``DataLoader`` workers, its heads (``SimCLRProjectionHead``,
``BYOLProjectionHead``/``BYOLPredictionHead``), losses (``NTXentLoss``,
``NegativeCosineSimilarity``) and momentum helpers (``update_momentum``, ``cosine_schedule``).
What is shared, so that only the framework differs: the encoder (``tasks.pretrain.build_encoder``:
normalisation + backbone), the optimiser and warmup + cosine schedule (``ssl_models.train``), the
epochs, batch size and the augmentation strengths (``AugmentParams`` mapped onto lightly's
arguments; colour saturation and hue have no meaning for grey images and stay off, as in ours).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ssl_models.augment import BLUR_SIGMA_SIDE, AugmentParams
from ssl_models.methods.byol import BYOLParams
from ssl_models.train import TrainSettings, build_optimizer, total_steps, warmup_cosine

METHODS = ("simclr", "byol")


class LightlySimCLR(nn.Module):
    """Lightly's SimCLR example: backbone -> ``SimCLRProjectionHead`` -> ``NTXentLoss``."""

    def __init__(self, backbone: nn.Module, feature_dim: int, params: dict[str, Any]):
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(
            feature_dim, params.get("hidden_dim", 512), params.get("projection_dim", 128)
        )
        self.criterion = NTXentLoss(temperature=params.get("temperature", 0.5))

    def loss(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        z0, z1 = (self.projection_head(self.backbone(v)) for v in views)
        return self.criterion(z0, z1)

    def on_step_end(self, step: int, total: int) -> None:
        pass


class LightlyBYOL(nn.Module):
    """Lightly's BYOL example: online backbone + projection + prediction heads, momentum copies."""

    def __init__(self, backbone: nn.Module, feature_dim: int, params: dict[str, Any]):
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        hidden, out = params.get("hidden_dim", 4096), params.get("projection_dim", 256)
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(feature_dim, hidden, out)
        self.prediction_head = BYOLPredictionHead(out, hidden, out)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()
        self.momentum_base = params.get("momentum_base", 0.996)

    def _online(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x)))

    def _target(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.projection_head_momentum(self.backbone_momentum(x))

    def loss(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        x0, x1 = views
        p0, p1 = self._online(x0), self._online(x1)
        z0, z1 = self._target(x0), self._target(x1)
        # Lightly's example averages the two directions; ours sums BYOL's 2 - 2cos terms. The
        # gradient differs by a constant factor only, which AdamW does not see.
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

    def on_step_end(self, step: int, total: int) -> None:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cosine_schedule(step, total, self.momentum_base, 1.0)
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)


def lightly_model(method: str, backbone: nn.Module, feature_dim: int, params: dict[str, Any]) -> nn.Module:
    """LightlySSL's model of ``method`` (simclr | byol) around ``backbone``; heads sized as ours."""
    if method == "simclr":
        return LightlySimCLR(backbone, feature_dim, params)
    if method == "byol":
        return LightlyBYOL(backbone, feature_dim, params)
    raise ValueError(f"no LightlySSL peer for method {method!r}; choose one of {METHODS}")


def _view_kwargs(aug: AugmentParams, image_size: int) -> dict[str, Any]:
    return {
        "input_size": image_size,
        "cj_prob": aug.jitter_p,
        "cj_strength": 1.0,
        "cj_bright": aug.brightness,
        "cj_contrast": aug.contrast,
        "cj_sat": aug.saturation,
        "cj_hue": aug.hue,
        "min_scale": aug.crop_scale[0],
        "random_gray_scale": aug.grayscale_p,
        "sigmas": tuple(s * image_size / BLUR_SIGMA_SIDE for s in aug.blur_sigma),
        "hf_prob": aug.flip_p,
        "normalize": None,  # the encoder normalises, as ours does
    }


def lightly_transform(method: str, aug: AugmentParams, image_size: int) -> Callable[[Image.Image], list[Any]]:
    """LightlySSL's per-image transform of ``method`` with our augmentation strengths."""
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform, SimCLRTransform

    kwargs = _view_kwargs(aug, image_size)
    if method == "simclr":
        return SimCLRTransform(**kwargs, gaussian_blur=aug.blur_p)  # type: ignore[no-any-return]
    if method == "byol":  # BYOL's asymmetric views (table 6), as ours
        (blur_1, blur_2), (solarize_1, solarize_2) = BYOLParams.view_blur_p, BYOLParams.view_solarize_p
        return BYOLTransform(  # type: ignore[no-any-return]
            view_1_transform=BYOLView1Transform(**kwargs, gaussian_blur=blur_1, solarization_prob=solarize_1),
            view_2_transform=BYOLView2Transform(**kwargs, gaussian_blur=blur_2, solarization_prob=solarize_2),
        )
    raise ValueError(f"no LightlySSL transform for method {method!r}; choose one of {METHODS}")


class ImageDataset(Dataset[list[torch.Tensor]]):
    """uint8 images (N, C, H, W) as PIL images through a per-image transform."""

    def __init__(self, images: torch.Tensor, transform: Callable[[Image.Image], list[Any]]):
        self.images = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        image = self.images[index]
        pil = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
        return self.transform(pil)


def lightly_loader(
    images: torch.Tensor,
    transform: Callable[[Image.Image], list[Any]],
    batch_size: int,
    workers: int,
    seed: int,
    pin_memory: bool = False,
) -> DataLoader[list[torch.Tensor]]:
    """Shuffled full batches of views, the transforms running in ``workers`` processes."""
    return DataLoader(
        ImageDataset(images, transform),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


class _Step:
    """One optimiser step of a lightly model; the same optimiser and schedule as ``ssl_models``."""

    def __init__(
        self, model: nn.Module, settings: TrainSettings, steps: int, warmup: int, device: torch.device
    ):
        self.model = model
        self.device = device
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        model.to(device).to(memory_format=self.memory_format).train()
        self.optimizer = build_optimizer(model, settings)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(steps, warmup))
        self.total = steps
        self.done = 0

    def __call__(self, views: list[torch.Tensor]) -> torch.Tensor:
        views = [
            v.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format) for v in views
        ]
        loss = self.model.loss(views)  # type: ignore[operator]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.done}; lower the lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.done += 1
        self.model.on_step_end(self.done, self.total)  # type: ignore[operator]
        return loss.detach()


def train_lightly(
    model: nn.Module,
    loader: DataLoader[list[torch.Tensor]],
    settings: TrainSettings,
    device: str | torch.device = "cpu",
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """``settings.epochs`` epochs over ``loader``; one history row per epoch (loss, images/s).

    Images/s is wall time per epoch, waiting for the workers' batches included: what a
    LightlySSL user sees.
    """
    n, batch = len(loader.dataset), loader.batch_size or 1  # type: ignore[arg-type]
    steps = total_steps(n, settings)
    step = _Step(model, settings, steps, round(settings.warmup_epochs * (n // batch)), torch.device(device))
    history = []
    for epoch in range(settings.epochs):
        start, losses = time.perf_counter(), []
        for views in loader:
            losses.append(step(views))
        row = {
            "epoch": epoch + 1,
            "loss": torch.stack(losses).mean().item(),
            "images_per_s": len(losses) * batch / (time.perf_counter() - start),
        }
        history.append(row)
        if on_epoch_end:
            on_epoch_end(row)
    return history


def _forever(loader: DataLoader[list[torch.Tensor]]) -> Iterator[list[torch.Tensor]]:
    while True:
        yield from loader


def lightly_throughput(
    model: nn.Module,
    loader: DataLoader[list[torch.Tensor]],
    settings: TrainSettings,
    device: str | torch.device,
    steps: int,
    warmup: int,
) -> float:
    """Images/s over ``steps`` training steps after ``warmup`` (worker start-up left out)."""
    step = _Step(model, settings, warmup + steps, 0, torch.device(device))
    batches = _forever(loader)
    for _ in range(warmup):
        step(next(batches))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(next(batches))
    loss.item()  # waits for the device
    return steps * (loader.batch_size or 1) / (time.perf_counter() - start)
