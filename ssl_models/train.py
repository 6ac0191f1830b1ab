"""The pretraining loop: plain PyTorch, resumable to the exact same weights.

Randomness is keyed by step (data order by epoch, augmentation by step), so a run resumed
from a checkpoint sees the same batches and views as the uninterrupted run. The images come from
a ``BatchSource``: an in-memory tensor (``TensorBatches``), or a stream (the pipeline's Ray Data
shards) that yields each rank its own batches in an order fixed by (seed, epoch).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, get_args

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


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The random stream of one training step (of one rank, for ranks that draw their own batches)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + rank * 2**40)


class BatchSource(Protocol):
    """uint8 image batches (B, C, H, W), ``steps_per_epoch`` of them each epoch, in an order that
    is a function of the epoch alone, so that ``epoch(e, skip)`` resumes an epoch part way.

    ``global_batches``: every rank receives the whole global batch (and trains on its share of the
    views); otherwise each rank receives its own ``batch_size / world`` images.
    """

    @property
    def global_batches(self) -> bool: ...

    @property
    def batch_size(self) -> int: ...  # the global batch

    @property
    def steps_per_epoch(self) -> int: ...

    def epoch(self, epoch: int, skip: int) -> Generator[torch.Tensor, None, None]: ...


@dataclass(frozen=True)
class TensorBatches:
    """An in-memory uint8 tensor (N, C, H, W), in a seeded random order each epoch."""

    images: torch.Tensor
    batch_size: int
    seed: int
    global_batches: ClassVar[bool] = True

    @property
    def steps_per_epoch(self) -> int:
        return len(self.images) // self.batch_size

    def epoch(self, epoch: int, skip: int) -> Generator[torch.Tensor, None, None]:
        order = torch.randperm(len(self.images), generator=step_generator(self.seed, -1 - epoch))
        for i in range(skip, self.steps_per_epoch):
            rows = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.images[rows.to(self.images.device, non_blocking=True)]


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


@dataclass
class _EpochProgress:
    """The current epoch so far: what its row of the history is computed from, and what a
    checkpoint taken in the middle of it keeps (``saved``)."""

    loss_sum: float = 0.0
    steps: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0  # of ``seconds``, waiting for the batch source
    pending: list[torch.Tensor] = field(default_factory=list)  # losses not read yet, on the device

    def read_losses(self, steps_done: int) -> None:
        """One wait for the device for all the steps since the last read."""
        values = torch.stack(self.pending).tolist() if self.pending else []
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"loss is {value} at step {steps_done - len(values) + i}; lower the lr"
                )
            self.loss_sum += value
        self.pending.clear()

    def saved(self, world: int) -> dict[str, float]:
        """A collective: the loss is the ranks' mean, so a resumed epoch reports the global batch's."""
        loss_sum = all_reduce_sum(torch.tensor(self.loss_sum, dtype=torch.float64)).item() / world
        return {
            "loss_sum": loss_sum,
            "steps": self.steps,
            "seconds": self.seconds,
            "data_seconds": self.data_seconds,
        }

    def row(self, epoch: int, lr: float, batch_size: int, world: int) -> dict[str, float]:
        """The epoch's row of the history (a collective)."""
        return {
            "epoch": epoch,
            "loss": self.saved(world)["loss_sum"] / self.steps,
            "lr": lr,
            "images_per_s": self.steps * batch_size / self.seconds,
            "data_wait_share": self.data_seconds / self.seconds,
        }


def pretrain(
    method: SSLMethod,
    images: torch.Tensor | BatchSource,
    aug: AugmentParams,
    settings: TrainSettings,
    checkpoint_path: str | Path | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    stop_at_step: int | None = None,
    device: str | torch.device = "cpu",
    resume_from: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``method`` on uint8 images (N, C, H, W), a tensor or a ``BatchSource``; resume from a
    checkpoint if given.

    The checkpoint is a file (``checkpoint_path``: loaded if it exists, written atomically)
    or, for a caller that stores checkpoints itself, a state (``resume_from``) and a
    callback (``on_checkpoint``) that receives every state to save.

    Data parallel when ``torch.distributed`` is initialised, under ``DistributedDataParallel``
    with BatchNorm synchronised across ranks. With a tensor, every rank holds all the images,
    draws the same global batch of ``settings.batch_size`` images and its views, and trains on its
    1/world share: the single-process step on the global batch. A streaming source gives each
    rank its own images, whose views it draws itself. The history (loss, images/s, the share of
    the time spent waiting for data) is of the global batch.

    ``stop_at_step`` ends the run early after saving a checkpoint (used to test resuming).

    The step's losses stay on the device and are read once per epoch and before each
    checkpoint, so the CPU never waits for the GPU to report a loss. A non-finite loss is
    found at those reads, naming its step, before it reaches the history or a checkpoint;
    the steps after it until the read are wasted, which a diverged run can afford.
    """
    device = torch.device(device)
    world, rank = world_size(), get_rank()
    source = (
        TensorBatches(images, min(settings.batch_size, len(images)), settings.seed)
        if isinstance(images, torch.Tensor)
        else images
    )
    if source.batch_size % world:
        raise ValueError(
            f"batch_size {source.batch_size} is not divisible by the {world} workers;"
            f" make it a multiple of {world}"
        )
    steps_per_epoch = source.steps_per_epoch
    total = steps_per_epoch * settings.epochs
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
    progress = _EpochProgress()
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
        progress = _EpochProgress(**resume_from["running"])

    def save() -> None:
        state = {
            "model": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "step": result.steps,
            "history": result.history,
            "running": progress.saved(world),
            "settings": asdict(settings),
        }
        if on_checkpoint:
            on_checkpoint(state)

    model.train()
    bf16 = settings.precision == "bf16"
    while result.steps < total and result.steps != stop_at_step:
        epoch, index_in_epoch = divmod(result.steps, steps_per_epoch)
        batches = source.epoch(epoch, index_in_epoch)
        try:
            for _ in range(index_in_epoch, steps_per_epoch):
                start = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    raise RuntimeError(f"epoch {epoch + 1} ended after {_} of its {steps_per_epoch} batches")
                x = to_float(batch.to(device, non_blocking=True))
                waited = time.perf_counter() - start
                if source.global_batches:
                    views = method.make_views(x, aug, step_generator(settings.seed, result.steps))
                    views = [v.chunk(world)[rank] for v in views] if world > 1 else views
                else:
                    views = method.make_views(x, aug, step_generator(settings.seed, result.steps, rank))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = step_loss([_to_memory_format(v, memory_format) for v in views])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                result.steps += 1
                method.on_step_end(result.steps / total)
                progress.pending.append(loss.detach())
                end_of_epoch = result.steps % steps_per_epoch == 0
                every = settings.checkpoint_every_steps
                checkpoint = (
                    end_of_epoch or (every > 0 and result.steps % every == 0) or result.steps == stop_at_step
                )
                if checkpoint:
                    progress.read_losses(result.steps)  # waits for the device: the step's seconds include it
                progress.steps += 1
                progress.seconds += time.perf_counter() - start
                progress.data_seconds += waited
                if end_of_epoch:
                    row = progress.row(epoch + 1, optimizer.param_groups[0]["lr"], source.batch_size, world)
                    result.history.append(row)
                    progress = _EpochProgress()
                    if on_epoch_end:
                        on_epoch_end(row)
                if checkpoint:
                    save()
                if result.steps == stop_at_step:
                    break
        finally:
            batches.close()  # a stream's prefetching ends with its epoch, or with the run
    method.to(memory_format=torch.contiguous_format)
    return result
