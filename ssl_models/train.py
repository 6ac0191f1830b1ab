"""The pretraining loop: plain PyTorch, resumable to the exact same weights.

Randomness is keyed by step (data order by epoch, augmentation by step), so a run resumed
from a checkpoint sees the same batches and views as the uninterrupted run.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl_models.augment import AugmentParams, to_float
from ssl_models.distributed import all_reduce_sum, convert_sync_batchnorm, world_size
from ssl_models.distributed import rank as get_rank
from ssl_models.methods import SSLMethod

Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 1.0
    seed: int = 0
    checkpoint_every_steps: int = 0  # 0: at the end of each epoch only
    channels_last: bool = True
    precision: Precision = "fp32"  # bf16: autocast the forward pass and the loss to bfloat16
    compile: bool = False  # torch.compile the forward pass and the loss
    fused_optimizer: bool = True  # AdamW's fused kernel, when every parameter is on a GPU

    def __post_init__(self) -> None:
        if self.precision not in get_args(Precision):
            raise ValueError(
                f"unknown precision {self.precision!r}; choose one of {list(get_args(Precision))}"
            )


@dataclass
class TrainResult:
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    resumed_from_step: int = 0


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup to 1, then cosine decay to 0 (SGDR, Loshchilov 2017)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def total_steps(num_images: int, settings: TrainSettings) -> int:
    """Optimiser steps of a whole run: full batches only, ``settings.epochs`` passes."""
    return num_images // min(settings.batch_size, num_images) * settings.epochs


def build_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """No weight decay on biases and norm parameters (Goyal et al. 2017, section 5.1).

    AdamW is fused (one kernel launch for all parameters) when ``settings.fused_optimizer`` and
    every parameter is on a GPU; on a CPU it keeps PyTorch's default implementation.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    params = decay + no_decay
    fused = settings.fused_optimizer and bool(params) and all(p.is_cuda for p in params)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr, fused=fused or None)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=True)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; choose adamw or sgd")


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one training step: a function of (seed, step) alone."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _to_memory_format(view: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    # Views that are not image batches (MAE's mask noise, stacks of patches) stay as they are.
    return view.contiguous(memory_format=memory_format) if view.ndim == 4 else view


def _save_atomic(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint, loaded without unpickling arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)


def pretrain(
    method: SSLMethod,
    images: torch.Tensor,
    aug: AugmentParams,
    settings: TrainSettings,
    checkpoint_path: str | Path | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    stop_at_step: int | None = None,
    device: str | torch.device = "cpu",
    resume_from: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``method`` on uint8 ``images`` (N, C, H, W); resume from a checkpoint if given.

    The checkpoint is a file (``checkpoint_path``: loaded if it exists, written atomically)
    or, for a caller that stores checkpoints itself, a state (``resume_from``) and a
    callback (``on_checkpoint``) that receives every state to save.

    Data parallel when ``torch.distributed`` is initialised: every rank holds all the
    images, draws the same global batch of ``settings.batch_size`` images and its views,
    and trains on its 1/world share under ``DistributedDataParallel`` with BatchNorm
    synchronised across ranks, which is the single-process step on the global batch. The
    history (loss, images/s) is of the global batch.

    ``stop_at_step`` ends the run early after saving a checkpoint (used to test resuming).

    The step's losses stay on the device and are read once per epoch and before each
    checkpoint, so the CPU never waits for the GPU to report a loss. A non-finite loss is
    found at those reads, naming its step, before it reaches the history or a checkpoint;
    the steps after it until the read are wasted, which a diverged run can afford.
    """
    device = torch.device(device)
    world, rank = world_size(), get_rank()
    n = images.shape[0]
    batch_size = min(settings.batch_size, n)
    if batch_size % world:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the {world} workers; make it a multiple of {world}"
        )
    steps_per_epoch = n // batch_size
    total = total_steps(n, settings)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    method.to(device).to(memory_format=memory_format)
    model: nn.Module = method
    if world > 1:
        convert_sync_batchnorm(method)  # in place: a method is never itself a BatchNorm
        model = DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)
    # The compiled module shares ``method``'s parameters; checkpoints keep ``method``'s keys.
    step_loss = torch.compile(model) if settings.compile else model
    optimizer = build_optimizer(method, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, round(settings.warmup_epochs * steps_per_epoch))
    )
    result = TrainResult(steps=0)
    running = {"loss_sum": 0.0, "steps": 0, "seconds": 0.0}
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    if checkpoint_path:
        if checkpoint_path.exists():
            resume_from = load_checkpoint(checkpoint_path)
        on_checkpoint = partial(_save_atomic, path=checkpoint_path)
    if resume_from is not None:
        method.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])  # fused or not, as it was saved
        scheduler.load_state_dict(resume_from["scheduler"])
        torch.set_rng_state(resume_from["rng"])
        result.steps = result.resumed_from_step = resume_from["step"]
        result.history = resume_from["history"]
        running = resume_from["running"]

    pending: list[torch.Tensor] = []  # this rank's losses since the last read, on the device

    def read_losses() -> None:
        # One wait for the device for all the steps since the last read.
        values = torch.stack(pending).tolist() if pending else []
        first_step = result.steps - len(values)
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {first_step + i}; lower the lr")
            running["loss_sum"] += value
        pending.clear()

    def save() -> None:
        # Called on every rank (a collective): the saved partial loss is the ranks' mean, so
        # a resumed epoch still reports the global batch's loss.
        partial_loss = all_reduce_sum(torch.tensor(running["loss_sum"], dtype=torch.float64)).item() / world
        if on_checkpoint:
            on_checkpoint(
                {
                    "model": method.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "step": result.steps,
                    "history": result.history,
                    "running": {**running, "loss_sum": partial_loss},
                    "settings": asdict(settings),
                }
            )

    model.train()
    bf16 = settings.precision == "bf16"
    while result.steps < total:
        epoch, index_in_epoch = divmod(result.steps, steps_per_epoch)
        order = torch.randperm(n, generator=step_generator(settings.seed, -1 - epoch))
        start = time.perf_counter()
        rows = order[index_in_epoch * batch_size : (index_in_epoch + 1) * batch_size]
        batch = images[rows.to(images.device, non_blocking=True)]
        g = step_generator(settings.seed, result.steps)
        x = to_float(batch.to(device, non_blocking=True))
        views = method.make_views(x, aug, g)
        if world > 1:
            views = [v.chunk(world)[rank] for v in views]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = step_loss([_to_memory_format(v, memory_format) for v in views])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        result.steps += 1
        method.on_step_end(result.steps / total)
        pending.append(loss.detach())
        end_of_epoch = result.steps % steps_per_epoch == 0
        every = settings.checkpoint_every_steps
        checkpoint = end_of_epoch or (every > 0 and result.steps % every == 0) or result.steps == stop_at_step
        if checkpoint:
            read_losses()  # waits for the device: the step's seconds include its queued work
        running["steps"] += 1
        running["seconds"] += time.perf_counter() - start
        if end_of_epoch:
            # The global batch's loss: the mean of the ranks' losses (each the loss of its rows).
            loss_sum = all_reduce_sum(torch.tensor(running["loss_sum"], dtype=torch.float64)).item() / world
            row = {
                "epoch": epoch + 1,
                "loss": loss_sum / running["steps"],
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": running["steps"] * batch_size / running["seconds"],
            }
            result.history.append(row)
            running = {"loss_sum": 0.0, "steps": 0, "seconds": 0.0}
            if on_epoch_end:
                on_epoch_end(row)
        if checkpoint:
            save()
        if result.steps == stop_at_step:
            break
    method.to(memory_format=torch.contiguous_format)
    return result
