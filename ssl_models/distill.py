"""Distillation of a fine-tuned teacher into a smaller student on the unlabeled pool.

SimCLRv2 (Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised Learners"),
section 2.3, eq. (2): "L^distill = - sum_{x_i in D} [ sum_y P^T(y|x_i; tau) log P^S(y|x_i; tau) ]",
where "the teacher network, which produces P^T(y|x_i), is fixed during the distillation; only
the student network, which produces P^S(y|x_i), is trained". With labels, the paper uses
"a weighted combination" of the two losses; here that is
``distillation_loss + labeled_weight * cross_entropy`` (``labeled_weight`` = 0: eq. 2 alone).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import AugmentParams, augment, to_float
from ssl_models.backbones import num_features
from ssl_models.evaluate import augmented_batch, seeded_linear
from ssl_models.losses import distillation_loss
from ssl_models.train import TrainSettings, build_optimizer, step_generator, warmup_cosine


@dataclass(frozen=True)
class DistillSettings:
    temperature: float = 1.0
    labeled_weight: float = 0.0  # 0: pure distillation on unlabeled images (SimCLRv2, eq. 2)
    train: TrainSettings = field(default_factory=TrainSettings)


def student_classifier(encoder: nn.Module, num_classes: int, seed: int) -> nn.Sequential:
    """``encoder`` plus a linear head initialised from ``seed``: the shape ``finetune`` returns."""
    return nn.Sequential(encoder, seeded_linear(num_features(encoder), num_classes, seed))


def distill(
    teacher: nn.Module,
    student: nn.Module,
    unlabeled: Iterator[torch.Tensor],
    aug: AugmentParams,
    settings: DistillSettings,
    steps: int,
    labeled: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    on_eval: Callable[[int, nn.Module], None] | None = None,
    eval_every: int = 0,
) -> nn.Module:
    """Train a copy of the ``student`` classifier on the ``teacher``'s soft labels.

    Each step takes the next uint8 batch (B, C, H, W) of ``unlabeled``, augments it once, and
    both networks see that same view; the teacher (moved to ``device``) runs in eval mode
    without gradient. With ``labeled_weight`` > 0, a batch of ``labeled`` (images, labels) adds
    its cross entropy. ``on_eval(step, model)`` runs every ``eval_every`` steps before the last,
    as in ``finetune``.
    """
    if settings.labeled_weight > 0 and labeled is None:
        raise ValueError(f"labeled_weight={settings.labeled_weight} needs labeled=(images, labels)")
    device = torch.device(device)
    train = settings.train
    memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
    model = copy.deepcopy(student).to(device).to(memory_format=memory_format).train()
    teacher_was_training = teacher.training
    teacher.to(device).eval()
    optimizer = build_optimizer(model, train)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, max(1, steps // 20)))
    for step in range(steps):
        g = step_generator(train.seed, step)
        x = augment(to_float(next(unlabeled).to(device)), aug, g).contiguous(memory_format=memory_format)
        with torch.no_grad():
            teacher_logits = teacher(x)
        loss = distillation_loss(model(x), teacher_logits, settings.temperature)
        if settings.labeled_weight > 0 and labeled is not None:
            images, labels = labeled
            x, idx = augmented_batch(
                images, min(train.batch_size, len(images)), aug, g, device, memory_format
            )
            loss = loss + settings.labeled_weight * F.cross_entropy(model(x), labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_eval and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            on_eval(step + 1, model)
            model.train()
    teacher.train(teacher_was_training)
    return model.to(memory_format=torch.contiguous_format).eval()


def random_batches(images: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of ``images`` held in memory, drawn with replacement (``distill``'s
    ``unlabeled`` for a pool that fits; a streamed pool comes from the data loader instead)."""
    g = torch.Generator().manual_seed(seed)
    batch = min(batch_size, len(images))
    while True:
        yield images[torch.randint(len(images), (batch,), generator=g)]


def count_parameters(module: nn.Module) -> int:
    """The number of parameters (buffers such as BatchNorm statistics not included)."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def images_per_second(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> float:
    """Inference throughput on uint8 ``images`` in eval mode, after one warm-up batch."""
    model.eval()
    device = next(model.parameters()).device
    model(to_float(images[:batch_size].to(device)))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        model(to_float(images[i : i + batch_size].to(device)))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(images) / (time.perf_counter() - start)
