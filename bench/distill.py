"""Distilling the fine-tuned SimCLR teacher into a four-times-smaller student.

SimCLRv2's third step (Chen et al. 2020, section 2.3): the teacher is the default run's
pretrained small_cnn fine-tuned on 10% of the labels; the student, a tiny_cnn (8-16-32-64
channels), learns the teacher's soft labels on the 60,000 unlabeled training images. Baselines:
the same tiny_cnn trained on the 10% labels from scratch, for the config's fine-tuning steps and
for as many steps as distillation gets, and the teacher itself. Inference throughput is measured
at the end, the models taking turns, best of three rounds (the machine may be shared). It reuses
the default run's pretrained encoder (the checkpoint under workspace/pretrain/).

    .venv/bin/python -m bench.distill [--steps 1200] [--temperature 1.0] [--labeled-weight 1.0] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ssl_models.data import stratified_subset
from ssl_models.distill import (
    DistillSettings,
    count_parameters,
    distill,
    images_per_second,
    random_batches,
    student_classifier,
)
from ssl_models.evaluate import accuracy, classify, finetune
from tasks.config import load_config
from tasks.data import ingest_and_prepare
from tasks.pretrain import build_encoder, load_encoder, pretrain_encoder
from tasks.streaming import read_images

RESULTS = Path(__file__).parent / "results" / "distill.json"
LABEL_FRACTION = 0.1
THROUGHPUT_BATCH = 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200, help="distillation steps")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--labeled-weight", type=float, default=1.0, help="second distilled row; 0: skip it")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--profile", default="default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config("params.yaml", args.profile)
    data = ingest_and_prepare(cfg)
    pretrained = pretrain_encoder(cfg, data)  # returns at once when the default run finished it
    encoder = load_encoder(cfg, data, pretrained.encoder_path)
    unlabeled = read_images(cfg, data.unlabeled).images
    labeled, test = read_images(cfg, data.labeled), read_images(cfg, data.test)
    assert labeled.labels is not None and test.labels is not None
    num_classes = len(labeled.classes)
    idx = stratified_subset(labeled.labels, LABEL_FRACTION, seed=0)
    images, labels = labeled.images[idx], labeled.labels[idx]
    ft = cfg.evaluate.finetune
    aug, settings = ft.augment.params(), ft.settings(0)
    tiny_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"backbone": "tiny_cnn"})})

    def tiny_cnn() -> nn.Module:
        return build_encoder(tiny_cfg, data.mean, data.std)  # seeded: every row starts alike

    def fine_tuned(encoder: nn.Module, steps: int) -> nn.Module:
        return finetune(encoder, images, labels, num_classes, aug, settings, steps)

    def from_scratch(steps: int) -> nn.Module:
        return fine_tuned(tiny_cnn(), steps)

    def distilled(teacher: nn.Module, labeled_weight: float) -> nn.Module:
        student = student_classifier(tiny_cnn(), num_classes, seed=0)
        distill_settings = DistillSettings(args.temperature, labeled_weight, settings)
        batches = random_batches(unlabeled, settings.batch_size, settings.seed)
        return distill(teacher, student, batches, aug, distill_settings, args.steps, (images, labels))

    def run(name: str, steps: int, train: Callable[[], nn.Module]) -> nn.Module:
        start = time.perf_counter()
        model = train()
        runs.append((name, steps, model, time.perf_counter() - start))
        print(f"{name}, {steps} steps: {runs[-1][-1]:.0f} s", flush=True)
        return model

    load_before = os.getloadavg()[0]
    runs: list[tuple[str, int, nn.Module, float]] = []
    teacher = run("teacher: small_cnn, SimCLR + fine-tune", ft.steps, partial(fine_tuned, encoder, ft.steps))
    for steps in dict.fromkeys((ft.steps, args.steps)):  # one row when they are equal
        run("tiny_cnn supervised from scratch", steps, partial(from_scratch, steps))
    run("tiny_cnn distilled", args.steps, partial(distilled, teacher, 0.0))
    if args.labeled_weight > 0:
        name = f"tiny_cnn distilled + {args.labeled_weight:g} x labeled CE"
        run(name, args.steps, partial(distilled, teacher, args.labeled_weight))
    throughput: list[float] = [0.0] * len(runs)
    for _ in range(3):
        for i, (_, _, model, _) in enumerate(runs):
            throughput[i] = max(throughput[i], images_per_second(model, test.images, THROUGHPUT_BATCH))
    rows = [
        {
            "model": name,
            "steps": steps,
            "test_accuracy": accuracy(classify(model, test.images), test.labels),
            "parameters": count_parameters(model),
            "images_per_s": round(images_per_s),
            "train_seconds": round(seconds, 1),
        }
        for (name, steps, model, seconds), images_per_s in zip(runs, throughput, strict=True)
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    command = (
        f"python -m bench.distill --steps {args.steps} --temperature {args.temperature:g}"
        f" --labeled-weight {args.labeled_weight:g}" + (f" --threads {args.threads}" if args.threads else "")
    )
    RESULTS.write_text(
        json.dumps(
            {
                "command": command,
                "profile": args.profile,
                "date": datetime.date.today().isoformat(),
                "pretrain_sha": Path(pretrained.encoder_path).parent.name,
                "label_fraction": LABEL_FRACTION,
                "distill_steps": args.steps,
                "batch_size": settings.batch_size,
                "temperature": args.temperature,
                "torch_threads": torch.get_num_threads(),
                "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "throughput_batch_size": THROUGHPUT_BATCH,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"{'model':<42} {'steps':>5} {'test acc':>8} {'params':>7} {'images/s':>8} {'train s':>7}")
    for r in rows:
        print(
            f"{r['model']:<42} {r['steps']:>5} {r['test_accuracy']:>8.2%} {r['parameters']:>7,}"
            f" {r['images_per_s']:>8,} {r['train_seconds']:>7}"
        )


if __name__ == "__main__":
    main()
