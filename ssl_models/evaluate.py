"""Label-efficient evaluation: kNN and linear probe on frozen features, fine-tuning.

The supervised-from-scratch baseline is ``finetune`` on a randomly initialised encoder,
with the same labels, augmentations and number of steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import AugmentParams, augment, to_float
from ssl_models.backbones import num_features
from ssl_models.train import TrainSettings, build_optimizer, step_generator, warmup_cosine


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Frozen features of uint8 ``images`` (eval mode: BatchNorm uses running statistics)."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    feats = [
        encoder(to_float(images[i : i + batch_size].to(device))).cpu()
        for i in range(0, len(images), batch_size)
    ]
    encoder.train(was_training)
    return torch.cat(feats)


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN on cosine similarity (Wu et al. 2018, eq. 7): votes weigh exp(s / T)."""
    train = F.normalize(train_features, dim=1)
    k = min(k, len(train))
    predictions = []
    for i in range(0, len(test_features), batch_size):
        sims = F.normalize(test_features[i : i + batch_size], dim=1) @ train.T
        top_sims, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(sims), num_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sims / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def seeded_linear(in_features: int, out_features: int, seed: int) -> nn.Linear:
    """A linear layer initialised from ``seed``, whatever ran before: results do not depend on call order."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Linear(in_features, out_features)


@dataclass(frozen=True)
class LinearProbeSettings:
    steps: int = 500
    batch_size: int = 1024
    lr: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    settings: LinearProbeSettings,
    on_eval: Callable[[int, nn.Linear], None] | None = None,
    eval_every: int = 0,
) -> nn.Linear:
    """A linear classifier on frozen features, returned with the feature standardisation folded in.

    ``on_eval(step, head)`` runs every ``eval_every`` steps before the last (e.g. to report a
    validation accuracy to an early-stopping scheduler).
    """
    mean = train_features.mean(0)
    std = train_features.std(0) + 1e-6 if len(train_features) > 1 else torch.ones_like(mean)
    x = (train_features - mean) / std
    head = seeded_linear(x.shape[1], num_classes, settings.seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(settings.steps, 0))
    g = torch.Generator().manual_seed(settings.seed)
    batch = min(settings.batch_size, len(x))
    for step in range(settings.steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        loss = F.cross_entropy(head(x[idx]), train_labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_eval and eval_every and (step + 1) % eval_every == 0 and step + 1 < settings.steps:
            on_eval(step + 1, _fold(head, mean, std))
    return _fold(head, mean, std)


@torch.no_grad()
def _fold(head: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """``head`` applied to standardised features, as one layer on raw features."""
    folded = nn.Linear(head.in_features, head.out_features)
    folded.weight.copy_(head.weight / std)
    folded.bias.copy_(head.bias - (head.weight * (mean / std)).sum(1))
    return folded


def augmented_batch(
    images: torch.Tensor,
    batch: int,
    aug: AugmentParams,
    g: torch.Generator,
    device: torch.device,
    memory_format: torch.memory_format,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of uint8 ``images`` (drawn with ``g``), augmented: (views, indices)."""
    idx = torch.randint(len(images), (batch,), generator=g)
    x = augment(to_float(images[idx].to(device)), aug, g).contiguous(memory_format=memory_format)
    return x, idx


def finetune(
    encoder: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    aug: AugmentParams,
    settings: TrainSettings,
    steps: int,
    device: str | torch.device = "cpu",
    on_eval: Callable[[int, nn.Sequential], None] | None = None,
    eval_every: int = 0,
) -> nn.Sequential:
    """Train a copy of ``encoder`` plus a linear head end to end on labeled uint8 ``images``.

    ``on_eval(step, model)`` runs every ``eval_every`` steps before the last; the model is put
    back in training mode afterwards.
    """
    device = torch.device(device)
    head = seeded_linear(num_features(encoder), num_classes, settings.seed)
    model = nn.Sequential(copy.deepcopy(encoder), head)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model.to(device).to(memory_format=memory_format).train()
    optimizer = build_optimizer(model, settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, max(1, steps // 20)))
    batch = min(settings.batch_size, len(images))
    for step in range(steps):
        g = step_generator(settings.seed, step)
        x, idx = augmented_batch(images, batch, aug, g, device, memory_format)
        loss = F.cross_entropy(model(x), labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_eval and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            on_eval(step + 1, model)
            model.train()
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def classify(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Predicted classes of uint8 ``images``."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat(
        [
            model(to_float(images[i : i + batch_size].to(device))).argmax(1).cpu()
            for i in range(0, len(images), batch_size)
        ]
    )


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return (predictions == labels).float().mean().item()
